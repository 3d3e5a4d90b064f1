"""TE definitions of the kernels that read packed weights (see ``targets.tvm.quant``).

Each dequantizes in registers: ``w = (float(q) - float(zero)) * scale`` with
``q`` the integer code, exactly DequantizeLinear's arithmetic, so an artifact
matches onnxruntime on the same quantized IR up to summation order.

The int4 matmul reduces over the stored bytes (``_qmatmul_pairs``): both
nibbles of a byte per step with constant shifts and one scale load, vectorized
along N (K-major storage). Index arithmetic in these kernels is int64 (Relax's
index type), so nothing here may shift by an index-derived amount: int64 ->
float32 has no AVX2 instruction and LLVM scalarizes the loop (measured 2x).

Codes stored as uint32 are the ``words`` layout (MLC's; ``quant.pack_words``):
[rows, K/8] words along the reduction, read row by row (``word_code``).
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


def word_code(words: Any, row: Any, col: Any) -> Any:
    """The signed 4-bit code at (row, col) of uint32 words (eight per word along col, stored +7) as int32."""
    from tvm import tirx

    from targets.tvm.quant import PER_WORD, WORD_OFFSET

    shift = ((col % PER_WORD) * 4).astype("uint32")
    nibble = (words[row, col // PER_WORD] >> shift) & tirx.const(15, "uint32")
    return nibble.astype("int32") - WORD_OFFSET


def _word_weight(words, scale, row, col, group: int) -> Any:
    """W[row, col] in float32 from the words layout (scales [rows, groups], float16 or float32)."""
    return word_code(words, row, col).astype("float32") * scale[row, col // group].astype("float32")


def _weight(codes, scale, zero, row, col, group: int, bits: int, signed: bool, dtype: str) -> Any:
    q = _code(codes, row, col, bits, signed)
    g = col // group
    if zero is not None:
        q = q - zero[row, g].astype("int32")
    return q.astype(dtype) * scale[row, g].astype(dtype)


def _weight_kn(codes, scale, zero, kk, nn, group: int, bits: int, signed: bool, dtype: str) -> Any:
    """W[kk, nn] from K-major storage: codes [K/2, N] (4-bit pairs along K) or [K, N], scale/zero [K/group, N]."""
    from tvm import tirx

    if bits == 8:
        q = codes[kk, nn].astype("int32")
    else:
        # constant shifts picked by a select: a shift by ``kk % 2 * 4`` would be int64 (Relax's index
        # type), and int64 -> float32 has no AVX2 instruction (the whole loop was scalarized)
        byte = codes[kk // 2, nn].astype("int32")
        nibble = tirx.Select(kk % 2 == 0, byte & 15, byte >> 4)
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
    words = codes.dtype == "uint32"  # [N, K/8] (see the module docstring)
    if not words and bits == 4 and k % 2 == 0 and group % 2 == 0:
        out = _qmatmul_pairs(x, codes, scale, zero, signed=signed, group=group, k=k, n=n)
        if dtype != "float32":
            out = te.compute(out.shape, lambda *i: out[i].astype(dtype), name="qmatmul_cast")
        return out

    def body(*i):
        if words:
            w = _word_weight(codes, scale, i[-1], r, group)
        else:
            w = _weight_kn(codes, scale, zero, r, i[-1], group, bits, signed, "float32")
        return te.sum(x[(*i[:-1], r)].astype("float32") * w, axis=r)

    out = te.compute([*lead, n], body, name="qmatmul")
    if dtype != "float32":
        out = te.compute(out.shape, lambda *i: out[i].astype(dtype), name="qmatmul_cast")
    return out


def _qmatmul_pairs(x, codes, scale, zero, *, signed: bool, group: int, k: int, n: int):
    """4-bit ``qmatmul`` reducing over the K/2 stored bytes: both nibbles of a byte (constant shifts) in one
    step, one scale (both codes of a byte share a group when ``group`` is even)."""
    from tvm import te

    lead = list(x.shape[:-1])
    p = te.reduce_axis((0, k // 2), name="kp")

    def body(*i):
        nn, row = i[-1], i[:-1]
        byte = codes[p, nn].astype("int32")
        lo, hi = byte & 15, byte >> 4
        g = (2 * p) // group
        if signed:
            lo, hi = lo - 8, hi - 8
        if zero is not None:
            z = zero[g, nn].astype("int32")
            lo, hi = lo - z, hi - z
        pair = (x[(*row, 2 * p)].astype("float32") * lo.astype("float32")
                + x[(*row, 2 * p + 1)].astype("float32") * hi.astype("float32"))
        return te.sum(pair * scale[g, nn].astype("float32"), axis=p)

    return te.compute([*lead, n], body, name="qmatmul")


def qgather(codes, indices, scale, zero=None, *, bits: int, signed: bool, group: int, rows: int, cols: int,
            dtype: str = "float32"):
    """Rows of a packed [rows, cols] table: ``out[..., d] = W[indices[...], d]`` (negative indices wrap once)."""
    from tvm import te, tirx

    def body(*i):
        idx = indices[i[:-1]].astype("int64")
        row = tirx.if_then_else(idx < 0, idx + rows, idx)
        if codes.dtype == "uint32":
            return _word_weight(codes, scale, row, i[-1], group).astype(dtype)
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
