"""ggml tensor types: sizes, and quantize/dequantize of 2-D float32 rows, byte-identical to
ggml's ``ggml_quantize_chunk`` (the ``*_ref`` paths, or ``*_impl`` with an importance matrix).

Rows are processed in chunks of about 1 MB, on a thread pool with one thread per
usable core (numpy releases the GIL inside its loops, ctypes around the compiled
kernels of ``native``), so memory stays at a few chunks whatever the tensor size.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from compiler.errors import KilnError
from targets.gguf.quants import dequant, kquants, legacy
from targets.gguf.quants.native import with_native


@dataclasses.dataclass(frozen=True)
class GgmlType:
    name: str
    id: int
    block: int
    size: int  # bytes per block
    quantize: Callable | None = None  # (blocks, weights|None) -> (nb, size) uint8
    dequantize: Callable | None = None
    #: the imatrix weighting is per row (legacy types) rather than per super-block
    row_sigma: bool = False
    #: ``quantize`` takes ``out=`` (rows of the result) and writes there instead of allocating
    writes_out: bool = False

    def row_bytes(self, ncols: int) -> int:
        return ncols // self.block * self.size

    @property
    def quantized(self) -> bool:
        return self.name not in ("F32", "F16", "BF16")


TYPES: dict[str, GgmlType] = {t.name: t for t in (
    GgmlType("F32", 0, 1, 4),
    GgmlType("F16", 1, 1, 2),
    GgmlType("BF16", 30, 1, 2),
    GgmlType("Q4_0", 2, 32, 18, with_native("Q4_0", legacy.q4_0), dequant.q4_0, True, True),
    GgmlType("Q4_1", 3, 32, 20, with_native("Q4_1", legacy.q4_1), dequant.q4_1, True, True),
    GgmlType("Q5_0", 6, 32, 22, with_native("Q5_0", legacy.q5_0), dequant.q5_0, True, True),
    GgmlType("Q5_1", 7, 32, 24, with_native("Q5_1", legacy.q5_1), dequant.q5_1, True, True),
    GgmlType("Q8_0", 8, 32, 34, with_native("Q8_0", legacy.q8_0), dequant.q8_0, False, True),
    GgmlType("Q2_K", 10, 256, 84, kquants.q2_k, dequant.q2_k),
    GgmlType("Q3_K", 11, 256, 110, kquants.q3_k, dequant.q3_k),
    GgmlType("Q4_K", 12, 256, 144, kquants.q4_k, dequant.q4_k),
    GgmlType("Q5_K", 13, 256, 176, kquants.q5_k, dequant.q5_k),
    GgmlType("Q6_K", 14, 256, 210, kquants.q6_k, dequant.q6_k),
)}
BY_ID: dict[int, GgmlType] = {t.id: t for t in TYPES.values()}

#: float32 elements per work chunk. The 32-element types run a dozen numpy calls per chunk: 1 MB
#: chunks measured fastest (fewer calls; the data streams anyway), and still split an 8 MB tensor 8 ways
_CHUNK_ELEMENTS = {"Q8_0": 1 << 18, "Q4_0": 1 << 18, "Q4_1": 1 << 18, "Q5_0": 1 << 18, "Q5_1": 1 << 18}
_DEFAULT_CHUNK = 1 << 17
def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


_THREADS = max(1, min(16, _usable_cores()))
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(_THREADS, thread_name_prefix="kiln-quant")
    return _POOL


def get_type(name: str) -> GgmlType:
    try:
        return TYPES[name.upper()]
    except KeyError:
        raise KilnError(f"unknown ggml type {name!r}", hint=f"types: {', '.join(TYPES)}") from None


def fp32_to_bf16(x: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16: round to nearest even, NaNs kept quiet (uint16 bits)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = ((u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    if nan.any():
        rounded = np.where(nan, ((u >> 16) | 64).astype(np.uint16), rounded)
    return rounded


def quantize(x: np.ndarray, type_name: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """float32 (nrows, ncols) -> (nrows, row_bytes) uint8 in ggml's layout for ``type_name``."""
    t = get_type(type_name)
    x = np.ascontiguousarray(x, np.float32)
    if x.ndim == 1:
        x = x[None, :]
    nrows, ncols = x.shape
    if t.name == "F32":
        return x.view(np.uint8)
    if t.name == "F16":
        return x.astype(np.float16).view(np.uint8)
    if t.name == "BF16":
        return fp32_to_bf16(x).view(np.uint8)
    if ncols % t.block:
        raise KilnError(f"a row of {ncols} values is not a whole number of {t.name} blocks ({t.block})")
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, np.float32).reshape(-1)
        if imatrix.size != ncols:
            raise KilnError(f"the importance matrix has {imatrix.size} values for rows of {ncols}")
    out = np.empty((nrows, t.row_bytes(ncols)), np.uint8)
    per_chunk = _CHUNK_ELEMENTS.get(t.name, _DEFAULT_CHUNK if imatrix is None else _DEFAULT_CHUNK // 2)
    rows = max(1, per_chunk // ncols)
    spans = [(r, min(nrows, r + rows)) for r in range(0, nrows, rows)]

    def work(span: tuple[int, int]) -> None:
        a, b = span
        chunk = x[a:b]
        weights = None
        if imatrix is not None:
            if t.row_sigma:
                weights = legacy.row_weights(chunk, imatrix)
            else:
                weights = np.broadcast_to(imatrix, chunk.shape)
            weights = np.ascontiguousarray(weights).reshape(-1, t.block)
        blocks = chunk.reshape(-1, t.block)
        if t.writes_out:
            t.quantize(blocks, weights, out=out[a:b].reshape(-1, t.size))
        else:
            out[a:b] = t.quantize(blocks, weights).reshape(b - a, -1)

    if len(spans) == 1 or _THREADS == 1:
        for span in spans:
            work(span)
    else:
        for future in [_pool().submit(work, s) for s in spans]:
            future.result()
    return out


def dequantize(data: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Raw tensor bytes -> float32 array of ``shape`` (numpy order, rows last)."""
    t = get_type(type_name)
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if t.name == "F32":
        return raw.view(np.float32).reshape(shape)
    if t.name == "F16":
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    if t.name == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    blocks = raw.reshape(-1, t.size)
    return t.dequantize(blocks).astype(np.float32).reshape(shape)
