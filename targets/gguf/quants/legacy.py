"""The 32-element block types: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (quantize_row_*_ref, and the
importance-weighted quantize_row_*_impl when an imatrix is given).

Each function takes float32 blocks ``x`` of shape (nb, 32) (and, with an imatrix,
the per-element weights of the same shape) and returns (nb, type_size) uint8.
"""

from __future__ import annotations

import numpy as np

from targets.gguf.quants._kernels import (
    F, first_max, first_min, fp16_bits, make_qkx_quants, make_qx_quants, seq_sum,
)

#: the float32 just below 0.5: trunc(v + copysign(HALF_DOWN, v)) == roundf(v) for every
#: float32 |v| < 128 (checked exhaustively), one add cheaper than an exact roundf
HALF_DOWN = np.nextafter(F(0.5), F(0))
_SIGN = np.uint32(0x80000000)
_HALF_BITS = HALF_DOWN.view(np.uint32)
_U64_4 = np.uint64(4)
_U8_4 = np.uint8(4)


def _inverse(d: np.ndarray) -> np.ndarray:
    """1/d, or 0 where d == 0 (``d ? 1.0f/d : 0.0f``)."""
    with np.errstate(divide="ignore", over="ignore"):
        r = F(1) / d
    if not d.all():
        r[d == 0] = 0
    return r


_OFFSETS: dict[int, np.ndarray] = {}


def _block_starts(nb: int) -> np.ndarray:
    """0, 32, 64, ...: flat index of each block's first element (cached: chunks repeat sizes)."""
    o = _OFFSETS.get(nb)
    if o is None:
        o = _OFFSETS[nb] = np.arange(0, nb * 32, 32)
        o.flags.writeable = False
    return o


def _per_value(v: np.ndarray, width: int = 32) -> np.ndarray:
    """One value per block -> repeated over the block's elements: a contiguous multiply is much
    faster in numpy than broadcasting a (nb, 1) column."""
    return np.repeat(v, width).reshape(-1, width)


def _absmax_at(x: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Flat index of the first element of largest magnitude per block; ``a`` = |x|."""
    idx = np.argmax(a, axis=1)
    idx += _block_starts(x.shape[0])
    return idx


def _block_max(a: np.ndarray) -> np.ndarray:
    """Largest value of each (nb, 32) row of a C-contiguous array. A reduction along rows this short
    runs a loop per row (and argmax branches on the data); here five pairwise maxima over the flat
    array, shifted by 16, 8, 4, 2 and 1, each a long contiguous loop, leave row i's maximum at 32*i
    (positions between rows mix neighbours and are never read). NaNs propagate, as argmax picks them."""
    flat = a.reshape(-1)
    n = flat.size
    ping, pong = np.empty(n - 16, F), np.empty(n - 24, F)
    np.maximum(flat[:-16], flat[16:], out=ping)
    np.maximum(ping[:-8], ping[8:], out=pong)
    np.maximum(pong[:-4], pong[4:], out=ping[:n - 28])
    np.maximum(ping[:n - 30], ping[2:n - 28], out=pong[:n - 30])
    np.maximum(pong[:n - 31], pong[1:n - 30], out=ping[:n - 31])
    return ping[:n - 31:32].copy()


def _signed_absmax(x: np.ndarray, a: np.ndarray) -> np.ndarray:
    """The first element of largest magnitude per block (``a`` = |x|); +0 where that magnitude is not
    positive (all-zero blocks keep max = +0 in the C loop even if their first element is -0)."""
    idx = _absmax_at(x, a)
    mx = x.reshape(-1).take(idx)
    mx[~(a.reshape(-1).take(idx) > 0)] = 0
    return mx


def _header(out: np.ndarray, column: int, v: np.ndarray) -> None:
    """Store fp16(v) as the ``column``-th uint16 of each output row (row sizes are even)."""
    out.view(np.uint16)[:, column] = fp16_bits(v)


def _halves(q: np.ndarray, low_bits_only: bool = False, out: np.ndarray | None = None) -> np.ndarray:
    """Pack (nb, 32) nibbles as qs[j] = q[j] | q[j+16] << 4 (eight at a time, as uint64 lanes:
    with values < 16 the shift never carries across bytes; 5-bit quants are masked first).
    The lanes are taken with 1-D strided views: 2-D ones with 2-lane rows cost a loop per row."""
    q = np.ascontiguousarray(q, np.uint8)
    if low_bits_only:
        q = q & np.uint8(0x0F)
    q64 = q.view(np.uint64).reshape(-1)
    high = q64 << _U64_4
    if out is None:
        out = np.empty((q.shape[0], 16), np.uint8)
    o64 = out.view(np.uint64)  # may be unaligned (rows of 18 bytes): numpy copes
    np.bitwise_or(q64[0::4], high[2::4], out=o64[:, 0])
    np.bitwise_or(q64[1::4], high[3::4], out=o64[:, 1])
    return out


def _high_bits(q: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Bit 4 of each of the 32 quants as a little-endian uint32 qh, as 4 bytes: packbits with
    little bit order puts element 8k+i at bit i of byte k."""
    bits = np.packbits(q & np.uint8(0x10), axis=1, bitorder="little")
    if out is None:
        return bits
    out[...] = bits
    return out


def _clamp15(q: np.ndarray) -> np.ndarray:
    """MIN(15, q) for q in [0, 16] (uint8): q - (q >> 4), far cheaper than np.minimum on uint8."""
    q -= q >> _U8_4
    return q


def q8_0(x: np.ndarray, qw: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """quantize_row_q8_0_ref (an importance matrix does not change Q8_0 in llama.cpp either)."""
    nb = x.shape[0]
    v = np.abs(x)
    d = _block_max(v)
    d /= F(127)
    scale = _per_value(_inverse(d))
    np.multiply(x, scale, out=v)
    # roundf(v) = trunc(v + copysign(HALF_DOWN, v)); the scale buffer is free again and holds the halves
    half = np.bitwise_and(v.view(np.uint32), _SIGN, out=scale.view(np.uint32))
    half |= _HALF_BITS
    v += half.view(F)
    if out is None:
        out = np.empty((nb, 34), np.uint8)
    np.copyto(out[:, 2:].view(np.int8), v, casting="unsafe")  # float -> int8 truncates, like astype
    _header(out, 0, d)
    return out


def q4_0(x: np.ndarray, qw: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    nb = x.shape[0]
    if out is None:
        out = np.empty((nb, 18), np.uint8)
    if qw is not None:
        d, L = make_qx_quants(np.ascontiguousarray(x.T), 8, np.ascontiguousarray(qw.T))
        _header(out, 0, d)
        _halves(L.T, out=out[:, 2:])
        return out
    v = np.abs(x)
    d = _signed_absmax(x, v)
    d /= F(-8)
    np.multiply(x, _per_value(_inverse(d)), out=v)
    v += F(8.5)
    q = _clamp15(v.astype(np.uint8))
    _header(out, 0, d)
    _halves(q, out=out[:, 2:])
    return out


def _min_range(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1/Q5_1 without an imatrix: (min, d, (x - min) * id + 0.5) per block."""
    m = first_min(x, axis=1)
    d = first_max(x, axis=1) - m
    d /= F(levels)
    v = np.subtract(x, _per_value(m))
    v *= _per_value(_inverse(d))
    v += F(0.5)
    return m, d, v


def _qkx(x: np.ndarray, qw: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d, the_min, L = make_qkx_quants(np.ascontiguousarray(x.T), nmax, np.ascontiguousarray(qw.T),
                                    -0.9, 0.05, 36, False, strict_empty=False)
    return -the_min, d, np.ascontiguousarray(L.T)


def q4_1(x: np.ndarray, qw: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    nb = x.shape[0]
    if out is None:
        out = np.empty((nb, 20), np.uint8)
    if qw is not None:
        m, d, q = _qkx(x, qw, 15)
    else:
        m, d, v = _min_range(x, 15)
        q = _clamp15(v.astype(np.uint8))
    _header(out, 0, d)
    _header(out, 1, m)
    _halves(q, out=out[:, 4:])
    return out


def q5_0(x: np.ndarray, qw: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    nb = x.shape[0]
    if out is None:
        out = np.empty((nb, 22), np.uint8)
    if qw is not None:
        d, L = make_qx_quants(np.ascontiguousarray(x.T), 16, np.ascontiguousarray(qw.T))
        q = np.ascontiguousarray(L.T)
    else:
        v = np.abs(x)
        d = _signed_absmax(x, v)
        d /= F(-16)
        np.multiply(x, _per_value(_inverse(d)), out=v)
        v += F(16.5)
        q = v.astype(np.uint8)
        q -= q >> np.uint8(5)  # MIN(31, q) for q in [0, 32]
    _header(out, 0, d)
    _high_bits(q, out=out[:, 2:6])
    _halves(q, low_bits_only=True, out=out[:, 6:])
    return out


def q5_1(x: np.ndarray, qw: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    nb = x.shape[0]
    if out is None:
        out = np.empty((nb, 24), np.uint8)
    if qw is not None:
        m, d, q = _qkx(x, qw, 31)
    else:
        m, d, v = _min_range(x, 31)
        q = v.astype(np.uint8)  # no clamp in the reference: 32 wraps to 0 bits there too
    _header(out, 0, d)
    _header(out, 1, m)
    _high_bits(q, out=out[:, 4:8])
    _halves(q, low_bits_only=True, out=out[:, 8:])
    return out


def row_weights(x: np.ndarray, imatrix: np.ndarray, per_row_sigma: bool = True) -> np.ndarray:
    """The *_impl weights qw * sqrt(sigma2 + x^2), sigma2 = mean of x^2 over the whole row
    (summed left to right, as the C loop does). ``x`` is (nrows, ncols)."""
    sum_x2 = seq_sum(np.ascontiguousarray((x * x).T))
    sigma2 = sum_x2 / F(x.shape[1])
    return (imatrix[None, :].astype(F) * np.sqrt(sigma2[:, None] + x * x)).astype(F)
