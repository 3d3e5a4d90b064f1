"""TE definitions of the kernels that read packed weights (see ``targets.tvm.quant``).

Each dequantizes in registers: ``w = (float(q) - float(zero)) * scale`` with
``q`` the integer code, exactly DequantizeLinear's arithmetic, so an artifact
matches onnxruntime on the same quantized IR up to summation order.
"""

from __future__ import annotations

from typing import Any


def _code(codes: Any, row: Any, col: Any, bits: int, signed: bool) -> Any:
    """The integer code at (row, col) as int32 (4-bit codes: two per byte, low nibble first)."""
    if bits == 8:
        return codes[row, col].astype("int32")
    byte = codes[row, col // 2].astype("int32")
    nibble = (byte >> ((col % 2) * 4)) & 15
    return nibble - 8 if signed else nibble


def _weight(codes, scale, zero, row, col, group: int, bits: int, signed: bool, dtype: str) -> Any:
    q = _code(codes, row, col, bits, signed)
    g = col // group
    if zero is not None:
        q = q - zero[row, g].astype("int32")
    return q.astype(dtype) * scale[row, g].astype(dtype)


def _weight_kn(codes, scale, zero, kk, nn, group: int, bits: int, signed: bool, dtype: str) -> Any:
    """W[kk, nn] from K-major storage: codes [K/2, N] (4-bit pairs along K) or [K, N], scale/zero [K/group, N]."""
    if bits == 8:
        q = codes[kk, nn].astype("int32")
    else:
        nibble = (codes[kk // 2, nn].astype("int32") >> ((kk % 2) * 4)) & 15
        q = nibble - 8 if signed else nibble
    g = kk // group
    if zero is not None:
        q = q - zero[g, nn].astype("int32")
    return q.astype(dtype) * scale[g, nn].astype(dtype)


def qmatmul(x, codes, scale, zero=None, *, bits: int, signed: bool, group: int, k: int, n: int):
    """``x[..., K] @ W[K, N]`` with W stored K-major (see `_weight_kn`)."""
    from tvm import te

    dtype = x.dtype
    lead = list(x.shape[:-1])
    r = te.reduce_axis((0, k), name="k")

    def body(*i):
        w = _weight_kn(codes, scale, zero, r, i[-1], group, bits, signed, "float32")
        return te.sum(x[(*i[:-1], r)].astype("float32") * w, axis=r)

    out = te.compute([*lead, n], body, name="qmatmul")
    if dtype != "float32":
        out = te.compute(out.shape, lambda *i: out[i].astype(dtype), name="qmatmul_cast")
    return out


def qgather(codes, indices, scale, zero=None, *, bits: int, signed: bool, group: int, rows: int, cols: int,
            dtype: str = "float32"):
    """Rows of a packed [rows, cols] table: ``out[..., d] = W[indices[...], d]`` (negative indices wrap once)."""
    from tvm import te, tirx

    def body(*i):
        idx = indices[i[:-1]].astype("int64")
        row = tirx.if_then_else(idx < 0, idx + rows, idx)
        return _weight(codes, scale, zero, row, i[-1], group, bits, signed, dtype)

    return te.compute([*indices.shape, cols], body, name="qgather")


def qdequantize(codes, scale, zero=None, *, bits: int, signed: bool, axis: int, block: int, shape: list[int],
                dtype: str = "float32"):
    """The whole weight, from flat codes [1, numel]: per tensor (axis -1), per channel, or blocked along axis."""
    from tvm import te

    def body(*i):
        flat = 0
        for dim, idx in zip(shape, i):
            flat = flat * dim + idx
        q = _code(codes, 0, flat, bits, signed)
        if axis == -1:
            s_idx: tuple = (0,)
        elif block == 0:
            s_idx = (i[axis],)
        else:
            s_idx = tuple(idx // block if d == axis else idx for d, idx in enumerate(i))
        if zero is not None:
            q = q - zero[s_idx].astype("int32")
        return q.astype(dtype) * scale[s_idx].astype(dtype)

    return te.compute(list(shape), body, name="qdequantize")
