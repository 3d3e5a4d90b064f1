"""The TVM runtime libraries for another architecture, taken from the apache-tvm wheels on PyPI.

``ensure_runtime("aarch64")`` returns a folder holding ``libtvm_runtime.so``
and ``libtvm_ffi.so`` for that architecture, of the same versions as the TVM
installed here. They are fetched once with ``pip download`` (the only network
access, from PyPI) and cached under ``$KILN_CACHE`` (default
``~/.cache/kiln``)/``tvm-runtime/``. ``$KILN_TVM_RUNTIME_<ARCH>`` (e.g.
``KILN_TVM_RUNTIME_AARCH64``) names a folder to use instead, for machines
without network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from compiler.errors import KilnError
from targets.tvm import _env

#: wheel platform tag per architecture (manylinux2014 has no aarch64 apache-tvm wheel)
WHEEL_PLATFORMS = {"aarch64": "manylinux_2_28_aarch64"}
LIBS = {"apache-tvm": "tvm/lib/libtvm_runtime.so", "apache-tvm-ffi": "tvm_ffi/lib/libtvm_ffi.so"}


def supported(arch: str) -> bool:
    return arch in WHEEL_PLATFORMS


def ensure_runtime(arch: str) -> Path:
    """The folder with this TVM's runtime libraries for ``arch`` (fetched and cached on first use)."""
    override = os.environ.get(f"KILN_TVM_RUNTIME_{arch.upper()}")
    if override:
        folder = Path(override)
        if not all((folder / Path(p).name).is_file() for p in LIBS.values()):
            raise KilnError(f"KILN_TVM_RUNTIME_{arch.upper()}={override} lacks libtvm_runtime.so / libtvm_ffi.so")
        return folder
    if arch not in WHEEL_PLATFORMS:
        raise KilnError(f"kiln has no TVM runtime for {arch} (it fetches one for {', '.join(WHEEL_PLATFORMS)})")
    versions = _env.versions()
    tag = f"tvm-{versions['apache-tvm']}-ffi-{versions['apache-tvm-ffi']}"
    folder = _env.cache_dir() / "tvm-runtime" / tag / arch
    if all((folder / Path(p).name).is_file() for p in LIBS.values()):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=folder.parent) as tmp:
        wheels = Path(tmp) / "wheels"
        _download(arch, versions, wheels)
        staged = Path(tmp) / arch
        staged.mkdir()
        for dist, member in LIBS.items():
            wheel = _find_wheel(wheels, dist)
            with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(staged / Path(member).name, "wb") as dst:
                shutil.copyfileobj(src, dst)
        try:
            os.rename(staged, folder)
        except OSError:
            if not folder.is_dir():  # another process won the race: use its copy
                raise
    return folder


def _download(arch: str, versions: dict[str, str], dest: Path) -> None:
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--platform", WHEEL_PLATFORMS[arch], "--python-version", py, "-d", str(dest),
           *(f"{dist}=={version}" for dist, version in versions.items())]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise KilnError(f"cannot fetch the {arch} TVM runtime from PyPI: {err}") from None
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        raise KilnError(f"cannot fetch the {arch} TVM runtime from PyPI: {lines[-1] if lines else 'pip failed'}",
                        hint=f"or set KILN_TVM_RUNTIME_{arch.upper()} to a folder with libtvm_runtime.so and libtvm_ffi.so")


def _find_wheel(folder: Path, dist: str) -> Path:
    stem = dist.replace("-", "_") + "-"
    for path in sorted(folder.glob("*.whl")):
        if path.name.startswith(stem):
            return path
    raise KilnError(f"pip downloaded no {dist} wheel")
