"""Run a Linux artifact built for another architecture under qemu user-mode emulation.

The artifact's ``lib.so`` is loaded by ``kiln_tvm_run`` (``loader/kiln_tvm_run.c``),
a small C program cross-compiled on first use with the target's toolchain
and cached, linked against the target's TVM runtime (``runtime_dist``). It
runs as ``qemu-aarch64 -L /usr/aarch64-linux-gnu``: the emulator and sysroot
named by the target spec (Debian's ``qemu-user`` and ``gcc-aarch64-linux-gnu``).
Inputs and outputs cross as raw files in a temporary folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import ArtifactError, KilnError
from targets.tvm import _env, params, runtime_dist
from targets.tvm.export import LIB_SO
from targets.tvm.run import name_outputs, ordered_inputs

LOADER_SOURCE = "kiln_tvm_run.c"
#: DLPack type codes -> numpy kinds
_DL_KINDS = {0: "i", 1: "u", 2: "f", 6: "b"}
RUN_TIMEOUT_S = 1800


def _target(manifest: Mapping[str, Any]) -> tuple[str, str, dict[str, Any]]:
    from targets.triple import parse_triple

    spec = manifest["target"]
    triple = parse_triple(spec["triple"])
    return triple.arch, triple.platform, spec["toolchain"]


def unavailable_reason(manifest: Mapping[str, Any]) -> str | None:
    """Why this artifact cannot run under emulation here (None when it can)."""
    arch, platform, tc = _target(manifest)
    if platform != "linux":
        return f"kiln emulates Linux artifacts only (this one is for {platform})"
    if not runtime_dist.supported(arch):
        return f"kiln has no TVM runtime to emulate {arch} with"
    if manifest["entry"] != LIB_SO:
        return "the artifact holds objects (lib.tar), not a linked lib.so"
    emulator = tc.get("emulator")
    if not emulator or shutil.which(emulator) is None:
        return f"no {emulator or 'emulator'} on this machine (apt-get install qemu-user)"
    if not Path(tc.get("sysroot", "")).is_dir() or shutil.which(tc["cc"]) is None:
        return f"no {tc['cc']} and its sysroot on this machine ({tc.get('install_hint', 'install the cross toolchain')})"
    try:
        runtime_dist.ensure_runtime(arch)
    except KilnError as err:
        return str(err)
    return None


def build_loader(arch: str, cc: str, runtime: Path) -> Path:
    """The loader for ``arch`` (cross-compiled once per source/TVM version, then cached)."""
    import tvm_ffi

    source = resources.files("targets.tvm").joinpath("loader", LOADER_SOURCE).read_bytes()
    versions = _env.versions()
    key = hashlib.sha256(source + repr(sorted(versions.items())).encode() + cc.encode()).hexdigest()[:16]
    folder = _env.cache_dir() / "tvm-loader" / f"{arch}-{key}"
    exe = folder / "kiln_tvm_run"
    if exe.is_file():
        return exe
    folder.mkdir(parents=True, exist_ok=True)
    include = Path(tvm_ffi.__file__).parent / "include"
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src = Path(tmp) / LOADER_SOURCE
        src.write_bytes(source)
        out = Path(tmp) / "kiln_tvm_run"
        cmd = [cc, "-O2", "-std=c11", "-o", str(out), str(src), f"-I{include}", f"-L{runtime}",
               "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise KilnError(f"cannot build the {arch} loader with {cc}: {proc.stderr.strip().splitlines()[-1:]}")
        os.replace(out, exe)
    return exe


class EmulatedRunner:
    """Runs ``main`` of an artifact for another architecture under qemu, one process per call."""

    def __init__(self, artifact_dir: Path, manifest: dict[str, Any]) -> None:
        why = unavailable_reason(manifest)
        if why:
            raise ArtifactError(f"{artifact_dir}: cannot emulate it: {why}")
        arch, _, tc = _target(manifest)
        self.dir = Path(os.path.abspath(artifact_dir))
        self.lib = self.dir / manifest["entry"]
        self.runtime = runtime_dist.ensure_runtime(arch)
        self.loader = build_loader(arch, shutil.which(tc["cc"]), self.runtime)
        self.emulator = shutil.which(tc["emulator"])
        self.sysroot = tc["sysroot"]
        backend = manifest["backend"]
        self.input_names = list(backend["inputs"])
        self.output_names = [o["name"] for o in manifest["signature"]["outputs"]]
        self.param_names = list(backend["params"].get("names", []))

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = ordered_inputs(inputs, self.input_names)
        with tempfile.TemporaryDirectory(prefix="kiln-emulate-") as tmp:
            work = Path(tmp)
            lines = []
            if self.param_names:
                lines.append(f"params {self.dir / params.PARAMS_DIR}")
                lines += [f"param {name}" for name in self.param_names]
            for i, x in enumerate(arrays):
                path = work / f"in_{i}.bin"
                x.tofile(path)
                dims = " ".join(str(d) for d in x.shape)
                lines.append(f"input {_dtype_name(x.dtype)} {x.ndim} {dims} {path}".replace("  ", " "))
            plan = work / "plan.txt"
            plan.write_text("\n".join(lines) + "\n")
            outdir = work / "out"
            outdir.mkdir()
            cmd = [self.emulator, "-L", self.sysroot, "-E", f"LD_LIBRARY_PATH={self.runtime}",
                   str(self.loader), str(self.lib), str(plan), str(outdir)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise ArtifactError(f"the emulated run took over {RUN_TIMEOUT_S} s") from None
            if proc.returncode != 0:
                lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
                raise ArtifactError(f"the emulated run failed (exit {proc.returncode}): {lines[-1] if lines else ''}")
            values = []
            for i in range(len(self.output_names)):
                values.append(_read_output(outdir, i))
        return name_outputs(values, self.output_names)


def _dtype_name(dtype: np.dtype) -> str:
    return "bool" if dtype == np.bool_ else np.dtype(dtype).name


def _read_output(folder: Path, index: int) -> np.ndarray:
    meta = folder / f"out_{index}.txt"
    if not meta.is_file():
        raise ArtifactError(f"the emulated run wrote no output {index}")
    code, bits, lanes, ndim, *dims = (int(v) for v in meta.read_text().split())
    if lanes != 1 or code not in _DL_KINDS or len(dims) != ndim:
        raise ArtifactError(f"output {index}: unsupported type (code {code}, {bits} bits x {lanes})")
    kind = _DL_KINDS[code]
    dtype = np.dtype(np.bool_) if kind == "b" else np.dtype(f"{kind}{bits // 8}")
    data = np.fromfile(folder / f"out_{index}.bin", dtype=dtype)
    return data.reshape(dims)
