"""Write the executable as ``lib.so`` linked for the target, or ``lib.tar`` of objects when no linker is here.

The linker is the spec's toolchain (``aarch64-linux-gnu-gcc`` from Debian's
``gcc-aarch64-linux-gnu``, an Android NDK clang under ``$ANDROID_NDK_HOME``,
...). For this machine's own architecture the system ``gcc`` (or ``cc``) is
used when the spec's compiler name is not installed. Apple, Windows and
wasm32 targets always get objects: this Linux host has no linker for them.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from targets.triple import find_compiler
from targets.tvm import _env

LIB_SO = "lib.so"
LIB_TAR = "lib.tar"
#: the ELF e_machine of each architecture (checked by tests and by the emulator)
ELF_MACHINE = {"x86_64": 62, "aarch64": 183, "armv7a": 40, "riscv64": 243}


@dataclasses.dataclass
class Linked:
    file: str  # lib.so or lib.tar
    linker: str | None  # the compiler that linked lib.so
    note: str | None  # why it is lib.tar, and what to install


def linker_for(spec: Any) -> tuple[str | None, str | None]:
    """(compiler path, None) for a lib.so, or (None, one-line reason + what to install)."""
    triple = spec.parsed_triple
    platform = triple.platform
    if platform not in ("linux", "android"):
        what = {"darwin": "Xcode's clang on macOS", "ios": "Xcode's clang on macOS", "wasm": "emscripten's emcc",
                "windows": "MSVC's link.exe on Windows"}.get(platform, "the platform's linker")
        return None, f"{spec.triple} libraries are linked with {what}; link lib.tar's objects there"
    path = find_compiler(spec)
    if path is None and platform == "linux" and triple.arch == _env.host_arch():
        path = shutil.which("gcc") or shutil.which("cc")
    if path is not None:
        return path, None
    tc = spec.toolchain
    hint = tc.get("install_hint") or (f"apt-get install {tc['debian_package']}" if "debian_package" in tc else "")
    return None, f"no {tc['cc']} on this machine to link lib.so for {spec.triple}" + (f"; {hint}" if hint else "")


def export(executable: Any, spec: Any, out_dir: Path) -> Linked:
    """Write lib.so (or lib.tar) into ``out_dir``."""
    _env.tvm()
    from tvm.support import cc

    compiler, why = linker_for(spec)
    if compiler is None:
        executable.export_library(str(out_dir / LIB_TAR))
        return Linked(LIB_TAR, None, f"wrote lib.tar (objects): {why}")
    fcompile = cc.cross_compiler(compiler)
    executable.export_library(str(out_dir / LIB_SO), fcompile=fcompile)
    return Linked(LIB_SO, Path(compiler).name, None)


def elf_machine(path: Path) -> int | None:
    """The e_machine field of an ELF file (183 = AArch64, 62 = x86-64), None when not ELF."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    order = "little" if head[5] == 1 else "big"
    return int.from_bytes(head[18:20], order)
