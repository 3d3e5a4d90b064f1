"""The 256-element super-block types Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Without an importance matrix these follow ``quantize_row_*_K_ref``; with one,
``quantize_row_*_K_impl`` (weights = imatrix * sqrt(sigma2 + x^2)). Input: float32
super-blocks ``x`` of shape (NB, 256) and optional imatrix weights of the same
shape; output (NB, type_size) uint8.
"""

from __future__ import annotations

import numpy as np

from targets.gguf.quants._kernels import (
    F, first_absmax, fp16_bits, fp16_round, make_q3_quants, make_qkx_quants, make_qp_quants, make_qx_quants,
    nearest_int, positive_max, seq_sum,
)

QK_K = 256


def _sub(x: np.ndarray, n: int) -> np.ndarray:
    """(NB, 256) -> (n, NB * 256/n): sub-blocks of n values, transposed."""
    return np.ascontiguousarray(x.reshape(-1, n).T)


def _per_block(v: np.ndarray, per: int) -> np.ndarray:
    """(NB*per,) sub-block values -> (NB, per)."""
    return v.reshape(-1, per)


def _sigma2(x: np.ndarray, factor: int) -> np.ndarray:
    """``factor*sum_x2/QK_K`` per super-block (``sum_x2`` summed left to right, as the C loop does)."""
    sum_x2 = seq_sum(np.ascontiguousarray((x * x).T))
    return (F(factor) * sum_x2 if factor != 1 else sum_x2) / F(QK_K)


def _requant(xs: np.ndarray, L: np.ndarray, d: np.ndarray, lo: int, hi: int, offset: np.ndarray | None) -> np.ndarray:
    """Redo the quants against the stored (fp16-rounded, 6/4-bit) scales: where the
    sub-block scale ``d`` is nonzero, L = clamp(nearest((x + offset) / d)) (+ -lo)."""
    ok = d != 0
    dd = np.where(ok, d, F(1))
    v = xs + offset if offset is not None else xs
    with np.errstate(all="ignore"):
        new = np.clip(nearest_int(v / dd), lo, hi) - lo
    return np.where(ok, new, L).astype(np.uint8)


def _pack2(L: np.ndarray) -> np.ndarray:
    """(NB, 256) 2-bit values -> (NB, 64): qs[j/4 + l] = L[j+l] | L[j+l+32]<<2 | L[j+l+64]<<4 | L[j+l+96]<<6."""
    q = L.reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The 12-byte 6-bit scale/min packing of Q4_K/Q5_K from (NB, 8) ls, lm."""
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def _k4_scales(scales: np.ndarray, mins: np.ndarray, qw: np.ndarray | None, sw: np.ndarray | None,
               clamp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """6-bit sub-block scales and mins of Q4_K/Q5_K: (ls, lm, d bits, dmin bits), each (NB, ...)."""
    sc = _per_block(scales, 8)
    mn = _per_block(mins, 8)
    if qw is None:
        max_scale = positive_max(sc, 1)
        max_min = positive_max(mn, 1)
        with np.errstate(divide="ignore"):
            inv_scale = np.where(max_scale > 0, F(63) / max_scale, F(0)).astype(F)
            inv_min = np.where(max_min > 0, F(63) / max_min, F(0)).astype(F)
        ls = np.minimum(nearest_int(inv_scale[:, None] * sc) & 0xFF, 63).astype(np.uint8)
        lm = np.minimum(nearest_int(inv_min[:, None] * mn) & 0xFF, 63).astype(np.uint8)
        return ls, lm, fp16_bits(max_scale / F(63)), fp16_bits(max_min / F(63))
    swt = np.ascontiguousarray(sw.T)
    d_block, Ls = make_qp_quants(np.ascontiguousarray(sc.T), 63, swt)
    m_block, Lm = make_qp_quants(np.ascontiguousarray(mn.T), 63, swt)
    ls, lm = Ls.T, Lm.T
    if clamp:
        ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
    return np.ascontiguousarray(ls), np.ascontiguousarray(lm), fp16_bits(d_block), fp16_bits(m_block)


def _q45_k(x: np.ndarray, qw: np.ndarray | None, nmax: int) -> tuple:
    nb = x.shape[0]
    xs = _sub(x, 32)
    if qw is None:
        sum_x2 = seq_sum(xs * xs)
        av_x = np.sqrt(sum_x2 / F(32))
        weights = av_x[None, :] + np.abs(xs)
        rmin, rdelta, nstep = (-1.0, 0.1, 20) if nmax == 15 else (-0.5, 0.1, 15)
        scales, mins, L = make_qkx_quants(xs, nmax, weights, rmin, rdelta, nstep, False, strict_empty=True)
        sw = None
    else:
        sigma2 = _sigma2(x, 2)
        weights = _sub(qw * np.sqrt(sigma2[:, None] + x * x), 32)
        sw = _per_block(seq_sum(weights), 8)
        scales, mins, L = make_qkx_quants(xs, nmax, weights, -0.9, 0.05, 36, False, strict_empty=False)
    ls, lm, d_bits, m_bits = _k4_scales(scales, mins, qw, sw, clamp=nmax == 31)
    d = fp16_round(d_bits.view(np.float16)).repeat(8) * ls.reshape(-1).astype(F)
    dm = fp16_round(m_bits.view(np.float16)).repeat(8) * lm.reshape(-1).astype(F)
    L = _requant(xs, L, d[None, :], 0, nmax, dm[None, :])
    head = np.empty((nb, 16), np.uint8)
    head[:, 0:2] = d_bits.view(np.uint8).reshape(nb, 2)
    head[:, 2:4] = m_bits.view(np.uint8).reshape(nb, 2)
    head[:, 4:16] = _pack_scales_k4(ls, lm)
    return head, L.T.reshape(nb, QK_K)


def q4_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    head, L = _q45_k(x, qw, 15)
    q = L.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([head, qs], axis=1)


def q5_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    head, L = _q45_k(x, qw, 31)
    q = L.reshape(-1, 4, 2, 32)  # [chunk of 64][low/high 32][j]
    lo = q & 0xF
    qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)
    hi = (q >> 4) & 1  # bit 2n for the first 32 of chunk n, bit 2n+1 for the second
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)
    qh = np.bitwise_or.reduce((hi << shifts[None, :, :, None]).reshape(-1, 8, 32), axis=1).astype(np.uint8)
    return np.concatenate([head, qh, qs], axis=1)


def q6_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    nb = x.shape[0]
    xs = _sub(x, 16)
    scales, L = make_qx_quants(xs, 32, _sub(qw, 16) if qw is not None else None)
    sc = _per_block(scales, 16)
    max_scale, max_abs = first_absmax(np.ascontiguousarray(sc.T))
    zero = max_abs < F(1e-15)
    with np.errstate(all="ignore"):
        iscale = F(-128) / np.where(zero, F(1), max_scale)
        d_bits = fp16_bits(F(1) / iscale)
    q_sc = np.minimum(nearest_int(iscale[:, None] * sc), 127)
    q_sc = (((q_sc + 128) & 0xFF) - 128).astype(np.int8)
    d = fp16_round(d_bits.view(np.float16))[:, None] * q_sc.astype(F)
    L = _requant(xs, L, d.reshape(-1)[None, :], -32, 31, None)
    L = L.T.reshape(nb, 2, 4, 32)  # [half of 128][quarter of 32][l]
    low = L & 0xF
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2).reshape(nb, 128)
    high = L >> 4
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(nb, 64)
    out = np.concatenate([ql, qh, q_sc.view(np.uint8), d_bits.view(np.uint8).reshape(nb, 2)], axis=1)
    out[zero] = 0
    return out


def q3_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    nb = x.shape[0]
    xs = _sub(x, 16)
    if qw is None:
        scales, L = make_q3_quants(xs, 4)
        sc = _per_block(scales, 16)
        max_scale, _ = first_absmax(np.ascontiguousarray(sc.T))
        nonzero = max_scale != 0
        with np.errstate(all="ignore"):
            iscale = F(-32) / np.where(nonzero, max_scale, F(1))
            d_bits = np.where(nonzero, fp16_bits(F(1) / iscale), np.uint16(0)).astype(np.uint16)
        l = nearest_int(iscale[:, None] * sc)
        l = ((l + 128) & 0xFF) - 128  # stored in an int8 first
        l = np.where(nonzero[:, None], np.clip(l, -32, 31) + 32, 0)
    else:
        sigma2 = _sigma2(x, 2)
        weights = _sub(qw * np.sqrt(sigma2[:, None] + x * x), 16)
        sw = _per_block(seq_sum(weights), 16)
        scales, L = make_qx_quants(xs, 4, weights)
        sc = _per_block(scales, 16)
        d_block, Ls = make_qx_quants(np.ascontiguousarray(sc.T), 32, np.ascontiguousarray(sw.T))
        l = Ls.T.astype(np.int32)
        d_bits = fp16_bits(d_block)
    l = l.astype(np.uint8)
    packed = np.zeros((nb, 12), np.uint8)
    packed[:, 0:8] = (l[:, :8] & 0xF) | ((l[:, 8:] & 0xF) << 4)
    hi = (l >> 4).reshape(nb, 4, 4)  # [j/4][j%4]
    packed[:, 8:12] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    d = fp16_round(d_bits.view(np.float16))[:, None] * (l.astype(F) - F(32))
    L = _requant(xs, L, d.reshape(-1)[None, :], -4, 3, None)
    L = L.T.reshape(nb, QK_K)
    hbit = (L > 3).astype(np.uint8)
    hmask = np.bitwise_or.reduce(hbit.reshape(nb, 8, 32) << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
    L = np.where(L > 3, L - 4, L).astype(np.uint8)
    out = np.concatenate([hmask.astype(np.uint8), _pack2(L), packed, d_bits.view(np.uint8).reshape(nb, 2)], axis=1)
    return out


def q2_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    nb = x.shape[0]
    xs = _sub(x, 16)
    if qw is None:
        scales, mins, L = make_qkx_quants(xs, 3, np.abs(xs), -0.5, 0.1, 15, True, strict_empty=True)
        sc = _per_block(scales, 16)
        mn = _per_block(mins, 16)
        max_scale = positive_max(sc, 1)
        max_min = positive_max(mn, 1)
        with np.errstate(all="ignore"):
            isc = np.where(max_scale > 0, F(15) / max_scale, F(0)).astype(F)
            imn = np.where(max_min > 0, F(15) / max_min, F(0)).astype(F)
        ls = np.where(max_scale[:, None] > 0, nearest_int(isc[:, None] * sc), 0)
        lm = np.where(max_min[:, None] > 0, nearest_int(imn[:, None] * mn), 0)
        byte = ((ls & 0xFF) | ((lm << 4) & 0xFF)).astype(np.uint8)
        d_bits = np.where(max_scale > 0, fp16_bits(max_scale / F(15)), np.uint16(0)).astype(np.uint16)
        m_bits = np.where(max_min > 0, fp16_bits(max_min / F(15)), np.uint16(0)).astype(np.uint16)
    else:
        sigma2 = _sigma2(x, 1)
        weights = _sub(qw * np.sqrt(sigma2[:, None] + x * x), 16)
        sw = np.ascontiguousarray(_per_block(seq_sum(weights), 16).T)
        scales, mins, L = make_qkx_quants(xs, 3, weights, -0.9, 0.05, 36, False, strict_empty=False)
        dm, Ls = make_qp_quants(np.ascontiguousarray(_per_block(scales, 16).T), 15, sw)
        mm, Lm = make_qp_quants(np.ascontiguousarray(_per_block(mins, 16).T), 15, sw)
        byte = (Ls.T | (Lm.T << 4)).astype(np.uint8)
        d_bits, m_bits = fp16_bits(dm), fp16_bits(mm)
    d = fp16_round(d_bits.view(np.float16))[:, None] * (byte & 0xF).astype(F)
    m = fp16_round(m_bits.view(np.float16))[:, None] * (byte >> 4).astype(F)
    L = _requant(xs, L, d.reshape(-1)[None, :], 0, 3, m.reshape(-1)[None, :])
    L = L.T.reshape(nb, QK_K)
    return np.concatenate([byte, _pack2(L), d_bits.view(np.uint8).reshape(nb, 2),
                           m_bits.view(np.uint8).reshape(nb, 2)], axis=1)
