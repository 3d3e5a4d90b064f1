"""Scalar-exact building blocks of llama.cpp's quantizers, vectorized across blocks.

Every array here is laid out *transposed*: shape ``(n, nb)`` holds ``nb``
independent blocks of ``n`` values, so element ``i`` of every block is one
contiguous row. The C reference accumulates its sums one element at a time in
float32; :func:`seq_sum` does the same (never numpy's pairwise summation), and
every product is formed in the C evaluation order, so the results are
bit-identical to ggml-quants.c compiled without FMA contraction (ggml-base is).
"""

from __future__ import annotations

import numpy as np

F = np.float32
#: ggml-quants.c GROUP_MAX_EPS
GROUP_MAX_EPS = F(1e-15)
_MAGIC = F(12582912.0)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: the 1.5*2^23 bit trick, reproduced bit for bit (int32)."""
    bits = (np.asarray(v, F) + _MAGIC).view(np.int32)
    return (bits & 0x7FFFFF) - 0x400000


#: below this magnitude nearest_int(v) == rint(v) (the magic-number sum keeps an ulp of 1)
_RINT_SAFE = F(4.0e6)


def round_clip(v: np.ndarray, lo: int, hi: int, bound: np.ndarray) -> np.ndarray:
    """clamp(nearest_int(v), lo, hi) as float32, in place on ``v``. ``bound`` is an upper bound of
    |v| per block (computed from the block's extreme elements, as rounding is monotone): when every
    bound is finite and small, np.rint is exact and three times cheaper than the bit trick."""
    if np.all(bound < _RINT_SAFE):  # NaN/inf bounds fail this test too
        np.rint(v, out=v)
        return np.clip(v, lo, hi, out=v)
    return np.clip(nearest_int(v), lo, hi).astype(F)


def seq_sum(terms: np.ndarray, first: bool = False) -> np.ndarray:
    """Sum along axis 0 strictly left to right in float32, starting from 0 (or from
    ``terms[0]`` when ``first``, as the C code does where it seeds a sum with element 0).

    numpy reduces a C-contiguous (n, nb) array along axis 0 row by row (the pairwise
    summation it uses elsewhere only applies along the contiguous axis), which is the C
    loop's order; ``+ 0`` turns the all-negative-zeros case into the C loop's +0. With
    few columns the reduction axis could become the inner loop, so those sum explicitly.
    """
    if terms.ndim == 2 and terms.shape[1] >= 16 and terms.flags.c_contiguous:
        total = np.add.reduce(terms, axis=0)
        return total if first else total + F(0)
    if first:
        total = terms[0].copy()
        rest = terms[1:]
    else:
        total = np.zeros(terms.shape[1:], F)
        rest = terms
    for row in rest:
        total += row
    return total


def first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the signed value, its magnitude) of the first element of largest magnitude per block."""
    ax = np.abs(x)
    idx = np.argmax(ax, axis=0)
    cols = np.arange(x.shape[1])
    amax = ax[idx, cols]
    return np.where(amax > 0, x[idx, cols], F(0)).astype(F), amax


def first_min(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """The C loop's ``if (v < min) min = v``: the first minimal element (so -0 vs +0 ties keep
    the earlier one, which decides the sign bit of a stored zero)."""
    idx = np.expand_dims(np.argmin(x, axis=axis), axis)
    return np.take_along_axis(x, idx, axis).squeeze(axis)


def first_max(x: np.ndarray, axis: int = 0) -> np.ndarray:
    idx = np.expand_dims(np.argmax(x, axis=axis), axis)
    return np.take_along_axis(x, idx, axis).squeeze(axis)


def positive_max(x: np.ndarray, axis: int) -> np.ndarray:
    """``m = 0; if (v > m) m = v``: the largest value, or +0 when none is positive."""
    m = x.max(axis=axis)
    return np.where(m > 0, m, F(0)).astype(F)


def fp16_bits(v: np.ndarray) -> np.ndarray:
    """float32 -> IEEE half bits, round to nearest even (ggml's GGML_FP32_TO_FP16)."""
    return np.asarray(v, F).astype(np.float16).view(np.uint16)


def fp16_round(v: np.ndarray) -> np.ndarray:
    """The float32 value a scale has after a trip through fp16."""
    return np.asarray(v, F).astype(np.float16).astype(F)


def _div(a: np.ndarray, b: np.ndarray, ok: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.where(ok, a / np.where(ok, b, F(1)), F(0)).astype(F)


def make_qx_quants(x: np.ndarray, nmax: int, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw): (scale per block, L in [0, 2*nmax))."""
    mx, amax = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F(1), mx)
    w = qw if qw is not None else x * x
    wx = w * x

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with np.errstate(all="ignore"):
            bound = np.abs(iscale * mx)  # the largest |iscale * x| of each block
        l = round_clip(iscale * x, -nmax, nmax - 1, bound)
        wl = w * l
        wl *= l
        return l, seq_sum(wx * l), seq_sum(wl)

    L, sumlx, suml2 = trial(F(-nmax) / mx)
    scale = _div(sumlx, suml2, suml2 != 0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F(nmax) + F(0.1) * F(step)) / mx
        l, slx, sl2 = trial(iscale)
        with np.errstate(all="ignore"):
            better = (sl2 > 0) & (slx * slx > best * sl2)
        if better.any():
            L = np.where(better, l, L)
            scale = np.where(better, _div(slx, sl2, better), scale)
            best = np.where(better, scale * slx, best)
    L = np.where(zero, F(0), L + F(nmax))
    return np.where(zero, F(0), scale).astype(F), L.astype(np.uint8)


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true): iterative weighted refit with w = x^2."""
    mx, amax = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F(1), mx)
    iscale = F(-nmax) / mx
    L = np.clip(nearest_int(iscale * x), -nmax, nmax - 1).astype(F)
    w = x * x
    wx = w * x
    sumlx = seq_sum(wx * L)
    suml2 = seq_sum(w * L * L)
    active = ~zero
    for _ in range(5):
        changed = np.zeros(x.shape[1], bool)
        for i in range(x.shape[0]):
            wi, xi, wxi, Li = w[i], x[i], wx[i], L[i]
            slx = sumlx - wxi * Li
            with np.errstate(all="ignore"):
                sl2 = suml2 - wi * Li * Li
                new_l = np.clip(nearest_int(xi * sl2 / slx), -nmax, nmax - 1).astype(F)
                cand = active & (slx > 0) & (new_l != Li)
                slx2 = slx + wxi * new_l
                sl22 = sl2 + wi * new_l * new_l
                take = cand & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            if take.any():
                L[i] = np.where(take, new_l, Li)
                sumlx = np.where(take, slx2, sumlx)
                suml2 = np.where(take, sl22, suml2)
                changed |= take
        active &= changed
        if not active.any():
            break
    scale = _div(sumlx, suml2, suml2 > 0)
    L = np.where(zero, F(0), L + F(nmax))
    return np.where(zero, F(0), scale).astype(F), L.astype(np.uint8)


def make_qkx_quants(
    x: np.ndarray, nmax: int, weights: np.ndarray, rmin: float, rdelta: float, nstep: int, use_mad: bool,
    strict_empty: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants / make_qkx3_quants (``strict_empty`` = qkx2's ``max == min`` test,
    else qkx3's ``max <= min``): (scale, the_min, L in [0, nmax])."""
    xmin = first_min(x)
    mx = first_max(x)
    sum_w = seq_sum(weights, first=True)
    sum_x = seq_sum(weights * x, first=True)
    mn = np.where(xmin > 0, F(0), xmin).astype(F)
    empty = (mx == mn) if strict_empty else (mx <= mn)
    span = np.where(empty, F(1), mx - mn)
    iscale = F(nmax) / span
    scale = F(1) / iscale
    xm = x - mn

    def quantize(isc: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):  # the C code divides by zero here too, and so do we
            bound = np.maximum(np.abs(isc * (mx - mn)), np.abs(isc * (xmin - mn)))
            return round_clip(xm * isc, 0, nmax, bound)

    def error(sc: np.ndarray, lv: np.ndarray, m: np.ndarray) -> np.ndarray:
        diff = lv * sc
        diff += m
        diff -= x
        if use_mad:
            np.abs(diff, out=diff)
        else:
            diff *= diff
        diff *= weights
        return seq_sum(diff)

    L = quantize(iscale)
    best = error(scale, L, mn)
    live = ~empty
    for step in range(nstep + 1):
        with np.errstate(all="ignore"):
            iscale = (F(rmin) + F(rdelta) * F(step) + F(nmax)) / np.where(live, mx - mn, F(1))
        laux = quantize(iscale)
        wl = weights * laux
        sum_l = seq_sum(wl)
        sum_xl = seq_sum(wl * x)
        wl *= laux
        sum_l2 = seq_sum(wl)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = live & (D > 0)
        if not ok.any():
            continue
        with np.errstate(all="ignore"):
            Dd = np.where(ok, D, F(1))
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / Dd
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Dd
            pos = this_min > 0
            this_min = np.where(pos, F(0), this_min)
            this_scale = np.where(pos, sum_xl / np.where(pos, sum_l2, F(1)), this_scale).astype(F)
        cur = error(this_scale, laux, this_min)
        take = ok & (cur < best)
        if take.any():
            L = np.where(take, laux, L)
            best = np.where(take, cur, best)
            scale = np.where(take, this_scale, scale)
            mn = np.where(take, this_min, mn)
            xm = x - mn
    scale = np.where(empty, F(0), scale).astype(F)
    L = np.where(empty, F(0), L)
    return scale, (-mn).astype(F), L.astype(np.uint8)


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants: quantize non-negative sub-block scales to [0, nmax] (L stored as uint8)."""
    mx = np.maximum(x.max(axis=0), F(0))
    zero = mx < GROUP_MAX_EPS
    mx = np.where(zero, F(1), mx)
    iscale = F(nmax) / mx
    scale = F(1) / iscale
    L = (nearest_int(iscale * x) & 0xFF).astype(F)
    diff = x - scale * L
    best = seq_sum(qw * diff * diff)
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (F(0.1) * F(step) + F(nmax)) / mx
        scale_is = F(1) / iscale_is
        l = np.minimum(nearest_int(iscale_is * x), nmax).astype(F)
        diff = x - scale_is * l
        mse = seq_sum(qw * diff * diff)
        better = mse < best
        best = np.where(better, mse, best)
        iscale = np.where(better, iscale_is, iscale)
    l = np.minimum(nearest_int(iscale * x), nmax).astype(F)
    L = (l.astype(np.int32) & 0xFF).astype(F)
    wx = qw * x
    sumlx = seq_sum(wx * l)
    suml2 = seq_sum(qw * l * l)
    active = ~zero
    for _ in range(5):
        changed = np.zeros(x.shape[1], bool)
        for i in range(x.shape[0]):
            wi, xi, wxi, Li = qw[i], x[i], wx[i], L[i]
            slx = sumlx - wxi * Li
            sl2 = suml2 - wi * Li * Li
            with np.errstate(all="ignore"):
                new_l = np.minimum(nearest_int(xi * sl2 / slx), nmax).astype(F)
                cand = active & (slx > 0) & (sl2 > 0) & (new_l != Li)
                slx2 = slx + wxi * new_l
                sl22 = sl2 + wi * new_l * new_l
                take = cand & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            if take.any():
                L[i] = np.where(take, (new_l.astype(np.int32) & 0xFF).astype(F), Li)
                sumlx = np.where(take, slx2, sumlx)
                suml2 = np.where(take, sl22, suml2)
                changed |= take
        active &= changed
        if not active.any():
            break
    scale = _div(sumlx, suml2, suml2 > 0)
    return np.where(zero, F(0), scale).astype(F), np.where(zero, F(0), L).astype(np.uint8)
