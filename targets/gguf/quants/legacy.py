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
    return np.divide(F(1), d, out=np.zeros_like(d), where=d != 0)


def _per_value(v: np.ndarray, width: int = 32) -> np.ndarray:
    """One value per block -> repeated over the block's elements: a contiguous multiply is much
    faster in numpy than broadcasting a (nb, 1) column."""
    return np.repeat(v, width).reshape(-1, width)


def _absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first element of largest magnitude, that magnitude) per row of (nb, 32); +0 for all-zero
    rows, as the C loops start from 0 and only take strictly larger magnitudes."""
    a = np.abs(x)
    idx = np.argmax(a, axis=1)
    idx += np.arange(0, x.size, x.shape[1])
    amax = a.reshape(-1).take(idx)
    return np.where(amax > 0, x.reshape(-1).take(idx), F(0)).astype(F), amax


def _halves(q: np.ndarray, low_bits_only: bool = False) -> np.ndarray:
    """Pack (nb, 32) nibbles as qs[j] = q[j] | q[j+16] << 4 (eight at a time, as uint64 lanes:
    with values < 16 the shift never carries across bytes; 5-bit quants are masked first)."""
    q = np.ascontiguousarray(q, np.uint8)
    if low_bits_only:
        q = q & np.uint8(0x0F)
    q64 = q.view(np.uint64)
    return (q64[:, :2] | (q64[:, 2:] << _U64_4)).view(np.uint8)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of each of the 32 quants as a little-endian uint32 qh, as 4 bytes."""
    bits = ((q.astype(np.uint32) >> 4) & 1) << np.arange(32, dtype=np.uint32)
    return np.bitwise_or.reduce(bits, axis=1).astype("<u4").view(np.uint8).reshape(-1, 4)


def _clamp15(q: np.ndarray) -> np.ndarray:
    """MIN(15, q) for q in [0, 16] (uint8): q - (q >> 4), far cheaper than np.minimum on uint8."""
    q -= q >> _U8_4
    return q


def q8_0(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    nb = x.shape[0]
    a = np.abs(x)
    idx = np.argmax(a, axis=1)
    idx += np.arange(0, x.size, 32)
    d = a.reshape(-1).take(idx) / F(127)
    v = _per_value(_inverse(d))
    v *= x
    half = v.view(np.uint32) & _SIGN
    half |= _HALF_BITS
    v += half.view(F)
    if out is None:
        out = np.empty((nb, 34), np.uint8)
    np.copyto(out[:, 2:].view(np.int8), v, casting="unsafe")  # float -> int8 truncates, like astype
    out[:, :2] = fp16_bits(d).view(np.uint8).reshape(nb, 2)
    return out


def q4_0(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    nb = x.shape[0]
    out = np.empty((nb, 18), np.uint8)
    if qw is not None:
        d, L = make_qx_quants(np.ascontiguousarray(x.T), 8, np.ascontiguousarray(qw.T))
        q = L.T
    else:
        mx, _ = _absmax(x)
        d = mx / F(-8)
        v = _per_value(_inverse(d))
        v *= x
        v += F(8.5)
        q = _clamp15(v.astype(np.uint8))
    out[:, :2] = fp16_bits(d).view(np.uint8).reshape(nb, 2)
    out[:, 2:] = _halves(q)
    return out


def q4_1(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    nb = x.shape[0]
    out = np.empty((nb, 20), np.uint8)
    if qw is not None:
        d, the_min, L = make_qkx_quants(np.ascontiguousarray(x.T), 15, np.ascontiguousarray(qw.T),
                                        -0.9, 0.05, 36, False, strict_empty=False)
        m = -the_min
        q = L.T
    else:
        m = first_min(x, axis=1)
        d = (first_max(x, axis=1) - m) / F(15)
        v = (x - m[:, None]) * _per_value(_inverse(d))
        v += F(0.5)
        q = _clamp15(v.astype(np.uint8))
    out[:, 0:2] = fp16_bits(d).view(np.uint8).reshape(nb, 2)
    out[:, 2:4] = fp16_bits(m).view(np.uint8).reshape(nb, 2)
    out[:, 4:] = _halves(q)
    return out


def q5_0(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    nb = x.shape[0]
    out = np.empty((nb, 22), np.uint8)
    if qw is not None:
        d, L = make_qx_quants(np.ascontiguousarray(x.T), 16, np.ascontiguousarray(qw.T))
        q = L.T
    else:
        mx, _ = _absmax(x)
        d = mx / F(-16)
        v = _per_value(_inverse(d))
        v *= x
        v += F(16.5)
        q = v.astype(np.uint8)
        q -= q >> 5  # MIN(31, q) for q in [0, 32]
    out[:, :2] = fp16_bits(d).view(np.uint8).reshape(nb, 2)
    out[:, 2:6] = _high_bits(q)
    out[:, 6:] = _halves(q, low_bits_only=True)
    return out


def q5_1(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    nb = x.shape[0]
    out = np.empty((nb, 24), np.uint8)
    if qw is not None:
        d, the_min, L = make_qkx_quants(np.ascontiguousarray(x.T), 31, np.ascontiguousarray(qw.T),
                                        -0.9, 0.05, 36, False, strict_empty=False)
        m = -the_min
        q = L.T
    else:
        m = first_min(x, axis=1)
        d = (first_max(x, axis=1) - m) / F(31)
        v = (x - m[:, None]) * _per_value(_inverse(d))
        v += F(0.5)
        q = v.astype(np.uint8)  # no clamp in the reference: 32 wraps to 0 bits there too
    out[:, 0:2] = fp16_bits(d).view(np.uint8).reshape(nb, 2)
    out[:, 2:4] = fp16_bits(m).view(np.uint8).reshape(nb, 2)
    out[:, 4:8] = _high_bits(q)
    out[:, 8:] = _halves(q, low_bits_only=True)
    return out


def row_weights(x: np.ndarray, imatrix: np.ndarray, per_row_sigma: bool = True) -> np.ndarray:
    """The *_impl weights qw * sqrt(sigma2 + x^2), sigma2 = mean of x^2 over the whole row
    (summed left to right, as the C loop does). ``x`` is (nrows, ncols)."""
    sum_x2 = seq_sum(np.ascontiguousarray((x * x).T))
    sigma2 = sum_x2 / F(x.shape[1])
    return (imatrix[None, :].astype(F) * np.sqrt(sigma2[:, None] + x * x)).astype(F)
