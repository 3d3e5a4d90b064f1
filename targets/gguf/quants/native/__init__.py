"""Compiled kernels for the 32-element block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1).

``legacy.c`` is compiled on first use with the system C compiler into kiln's cache
(``$KILN_CACHE``, default ``~/.cache/kiln``), under a name keyed by a hash of the source,
the compiler and the flags, and loaded with ctypes (whose calls release the GIL, so the
quantizer's thread pool runs them in parallel). Without a compiler, or if compiling or
loading fails, :func:`library` returns None and the numpy kernels are used; the reason is
logged at debug level. ``KILN_NO_NATIVE=1`` forces numpy.

The flags keep results exact: no -ffast-math, and -ffp-contract=off so no multiply-add is
fused (ggml-base is built the same way); the compiler may vectorize, which changes no result.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("legacy.c")
FLAGS = ("-O3", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared", "-std=c99")
#: kiln type name -> (exported symbol, bytes per 32-element block)
KERNELS = {"Q8_0": ("kiln_q8_0", 34), "Q4_0": ("kiln_q4_0", 18), "Q4_1": ("kiln_q4_1", 20),
           "Q5_0": ("kiln_q5_0", 22), "Q5_1": ("kiln_q5_1", 24)}

_lock = threading.Lock()
_loaded = False
_lib: ctypes.CDLL | None = None


def cache_dir() -> Path:
    root = os.environ.get("KILN_CACHE")
    return (Path(root) if root else Path(os.path.expanduser("~")) / ".cache" / "kiln") / "gguf-native"


def find_compiler() -> list[str] | None:
    """The C compiler Python was built with (``CC``) if it is installed, else ``cc``/``gcc``/``clang``."""
    configured = shlex.split(sysconfig.get_config_var("CC") or "")
    if configured and shutil.which(configured[0]):
        return [shutil.which(configured[0]), *configured[1:]]
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def _key(compiler: list[str]) -> str:
    """Hash of the source, the compiler (resolved path, size and mtime: an upgrade changes it), the flags
    and the machine type."""
    h = hashlib.sha256(SOURCE.read_bytes())
    exe = Path(compiler[0]).resolve()
    st = exe.stat()
    h.update(repr((str(exe), st.st_size, st.st_mtime_ns, compiler[1:], FLAGS, platform.machine())).encode())
    return h.hexdigest()[:20]


def _compile(compiler: list[str], target: Path) -> None:
    """Compile into a temporary file next to ``target`` and rename it into place (atomic: a parallel
    process either sees no file or a whole one)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([*compiler, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for symbol, _ in KERNELS.values():
        fn = getattr(lib, symbol)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn.restype = None
    lib.kiln_fp16.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.kiln_fp16.restype = None
    return lib


def _build() -> ctypes.CDLL | None:
    if os.environ.get("KILN_NO_NATIVE", "") not in ("", "0"):
        log.debug("KILN_NO_NATIVE is set: numpy quantizers")
        return None
    if sys.byteorder != "little":  # the kernels store GGUF's little-endian headers with memcpy
        log.debug("big-endian host: numpy quantizers")
        return None
    compiler = find_compiler()
    if compiler is None:
        log.debug("no C compiler found: numpy quantizers")
        return None
    try:
        target = cache_dir() / f"legacy-{_key(compiler)}.so"
        if target.exists():
            try:
                return _open(target)
            except OSError as e:  # a damaged cache entry: build it again
                log.debug("cached %s does not load (%s): recompiling", target, e)
        log.debug("compiling %s with %s", SOURCE.name, compiler[0])
        _compile(compiler, target)
        return _open(target)
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        detail = getattr(e, "stderr", b"") or b""
        log.debug("native quantizers unavailable (%s %s): numpy quantizers", e, detail.decode(errors="replace")[:500])
        return None


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built and loaded once per process (None: use numpy)."""
    global _loaded, _lib
    if not _loaded:
        with _lock:
            if not _loaded:
                _lib = _build()
                _loaded = True
    return _lib


def reset() -> None:
    """Forget the loaded library so the next :func:`library` call looks again (tests)."""
    global _loaded, _lib
    with _lock:
        _loaded, _lib = False, None


def kernel(type_name: str) -> Callable[[np.ndarray, np.ndarray], None] | None:
    """(blocks (nb, 32) float32 C-contiguous, out (nb, type_size) uint8 C-contiguous) -> None, or None."""
    lib = library()
    if lib is None or type_name not in KERNELS:
        return None
    fn = getattr(lib, KERNELS[type_name][0])

    def run(x: np.ndarray, out: np.ndarray) -> None:
        fn(x.ctypes.data, out.ctypes.data, x.shape[0])

    return run


def with_native(type_name: str, numpy_fn: Callable) -> Callable:
    """A quantizer (blocks, weights|None, out=None) that runs the compiled kernel when there is one
    and no importance matrix (the *_impl paths stay numpy; Q8_0 has none, llama.cpp ignores the
    matrix there), else ``numpy_fn``."""
    size = KERNELS[type_name][1]

    def quantize(x: np.ndarray, qw: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
        run = kernel(type_name) if qw is None or type_name == "Q8_0" else None
        if run is None or x.dtype != np.float32 or not x.flags.c_contiguous or x.shape[-1] != 32:
            return numpy_fn(x, qw, out=out)
        if out is None:
            out = np.empty((x.shape[0], size), np.uint8)
        if out.flags.c_contiguous:
            run(x, out)
        else:
            tmp = np.empty((x.shape[0], size), np.uint8)
            run(x, tmp)
            out[...] = tmp
        return out

    quantize.__name__ = type_name.lower()
    quantize.__doc__ = f"{type_name}: compiled kernel, or {numpy_fn.__module__}.{numpy_fn.__name__}"
    return quantize
