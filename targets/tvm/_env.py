"""Importing TVM, the versions kiln was built against, and facts about this host."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path
from typing import Any

from compiler.errors import KilnError

#: apache-tvm-ffi releases after this one segfault in tvm.ir.save_json (MetaSchedule's database)
FFI_PIN = "0.1.14.post0"
INSTALL_HINT = "pip install 'kiln[tvm]'  (apache-tvm 0.27 with apache-tvm-ffi==" + FFI_PIN + ")"

_HOST_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def tvm() -> Any:
    """The ``tvm`` module, or a KilnError naming the package to install."""
    try:
        import tvm as _tvm
    except ImportError as err:
        raise KilnError(f"--emit tvm needs Apache TVM, which is not installed ({err})", hint=INSTALL_HINT) from None
    return _tvm


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("apache-tvm", "apache-tvm-ffi"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def host_arch() -> str:
    machine = platform.machine().lower()
    return _HOST_ARCH.get(machine, machine)


@functools.cache
def host_cpu_flags() -> frozenset[str]:
    """The CPU feature flags of this machine (``/proc/cpuinfo``), empty when unknown.

    LLVM's own host detection is not used: in a VM it can name a CPU whose
    features the hypervisor hides (it reports znver4 where AVX-512 is off).
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


#: LLVM feature names -> /proc/cpuinfo flag names where they differ
_CPUINFO_NAME = {
    "sse4.2": "sse4_2", "sse4.1": "sse4_1", "avx512f": "avx512f", "avx512vnni": "avx512_vnni",
    "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16", "amx-tile": "amx_tile",
    "amx-int8": "amx_int8", "amx-bf16": "amx_bf16", "fma": "fma", "f16c": "f16c", "popcnt": "popcnt",
    "neon": "asimd", "dotprod": "asimddp", "fullfp16": "asimdhp", "i8mm": "i8mm", "bf16": "bf16",
    "crc": "crc32", "rcpc": "lrcpc", "sve": "sve",
}  # fmt: skip
#: LLVM features that are not CPU flags (architecture versions)
_NOT_FLAGS = ("v8.", "v9.")


def missing_cpu_features(mattr: list[str] | tuple[str, ...]) -> list[str]:
    """The ``+feature``s of an LLVM target this host's CPU lacks (empty when unknown)."""
    flags = host_cpu_flags()
    if not flags:
        return []
    missing = []
    for attr in mattr:
        if not attr.startswith("+") or attr[1:].startswith(_NOT_FLAGS):
            continue
        name = attr[1:]
        flag = _CPUINFO_NAME.get(name, name.replace(".", "_").replace("-", "_"))
        if flag not in flags:
            missing.append(name)
    return missing


def cache_dir() -> Path:
    """kiln's cache: ``$KILN_CACHE``, else ``~/.cache/kiln``."""
    root = os.environ.get("KILN_CACHE")
    path = Path(root) if root else Path(os.path.expanduser("~")) / ".cache" / "kiln"
    path.mkdir(parents=True, exist_ok=True)
    return path
