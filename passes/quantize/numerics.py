"""Reference quantize / dequantize in numpy: the one definition every scheme and backend shares.

Conventions follow ONNX DequantizeLinear: ``y = (q - zero) * scale``.

- per-tensor: ``block_size=-1``;
- per-channel: ``block_size=0``, ``axis`` is the channel axis (one scale per index of it);
- blocked: ``block_size=B > 0``, ``axis`` is the axis the blocks run along (the
  scale has that axis divided by B, rounded up).

Symmetric schemes use signed integers and a scale of ``absmax / (2**(bits-1) - 1)``;
affine schemes use unsigned integers over a range widened to include 0, so zero is
exact and every value rounds to within half a step.
"""

from __future__ import annotations

import numpy as np


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer range of a ``bits``-wide code: signed when symmetric, else unsigned."""
    if symmetric:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _blocked(w: np.ndarray, axis: int, block_size: int) -> tuple[np.ndarray, int]:
    """``w`` viewed as [..., nblocks, B, ...] along ``axis`` (zero padded); returns (view, pad)."""
    n = w.shape[axis]
    nblocks = -(-n // block_size)
    pad = nblocks * block_size - n
    if pad:
        widths = [(0, 0)] * w.ndim
        widths[axis] = (0, pad)
        w = np.pad(w, widths)
    shape = w.shape[:axis] + (nblocks, block_size) + w.shape[axis + 1 :]
    return w.reshape(shape), pad


def _reduce_axes(ndim: int, axis: int, block_size: int) -> tuple[int, ...]:
    if block_size == -1:
        return tuple(range(ndim))
    if block_size == 0:
        return tuple(i for i in range(ndim) if i != axis)
    return (axis + 1,)


def compute_params(
    w: np.ndarray, *, bits: int, axis: int = 0, block_size: int = 0, symmetric: bool = True,
    lo: np.ndarray | None = None, hi: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(scale, zero) for ``w``; ``lo``/``hi`` override the observed range (clipping searches).

    Shapes follow DequantizeLinear: a scalar per tensor, a vector per channel,
    and ``w``'s shape with ``axis`` divided into blocks when blocked.
    """
    w = np.asarray(w, dtype=np.float32)
    axis = axis % w.ndim if w.ndim else 0
    qmin, qmax = qrange(bits, symmetric)
    view = _blocked(w, axis, block_size)[0] if block_size > 0 else w
    red = _reduce_axes(view.ndim, axis, block_size)
    if lo is None:
        lo = view.min(axis=red) if view.size else np.zeros(())
    if hi is None:
        hi = view.max(axis=red) if view.size else np.zeros(())
    lo = np.minimum(np.asarray(lo, np.float32), 0.0)
    hi = np.maximum(np.asarray(hi, np.float32), 0.0)
    if symmetric:
        scale = np.maximum(-lo, hi) / qmax
        zero = None
    else:
        scale = (hi - lo) / (qmax - qmin)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    if not symmetric:
        zero = np.clip(np.round(qmin - lo / scale), qmin, qmax).astype(np.int32)
    return scale, zero


def _expand(p: np.ndarray, shape: tuple[int, ...], axis: int, block_size: int) -> np.ndarray:
    """Broadcast a scale/zero to the full (unpadded) weight shape."""
    if block_size == -1:
        return np.broadcast_to(p, shape)
    if block_size == 0:
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return p.reshape(view)
    full = np.repeat(p, block_size, axis=axis)
    index = [slice(None)] * len(shape)
    index[axis] = slice(0, shape[axis])
    return full[tuple(index)]


def quantize(
    w: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, *, bits: int, axis: int = 0,
    block_size: int = 0, symmetric: bool = True,
) -> np.ndarray:
    """Integer codes (int8 for signed, uint8 for unsigned storage; values within ``bits``)."""
    w = np.asarray(w, dtype=np.float32)
    axis = axis % w.ndim if w.ndim else 0
    qmin, qmax = qrange(bits, symmetric)
    s = _expand(scale, w.shape, axis, block_size)
    q = np.round(w / s)
    if zero is not None:
        q = q + _expand(zero, w.shape, axis, block_size)
    q = np.clip(q, qmin, qmax)
    return q.astype(np.int8 if symmetric else np.uint8)


def dequantize(
    q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, *, axis: int = 0, block_size: int = 0,
) -> np.ndarray:
    q = np.asarray(q)
    axis = axis % q.ndim if q.ndim else 0
    y = q.astype(np.float32)
    if zero is not None:
        y = y - _expand(np.asarray(zero, np.float32), q.shape, axis, block_size)
    return (y * _expand(np.asarray(scale, np.float32), q.shape, axis, block_size)).astype(np.float32)


def quantize_weight(
    w: np.ndarray, *, bits: int, axis: int = 0, block_size: int = 0, symmetric: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Round-to-nearest: (codes, scale, zero) for ``w``."""
    scale, zero = compute_params(w, bits=bits, axis=axis, block_size=block_size, symmetric=symmetric)
    q = quantize(w, scale, zero, bits=bits, axis=axis, block_size=block_size, symmetric=symmetric)
    return q, scale, zero


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when exact)."""
    ref = np.asarray(reference, np.float64).ravel()
    err = ref - np.asarray(approx, np.float64).ravel()
    noise = float(np.dot(err, err))
    signal = float(np.dot(ref, ref))
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return 10.0 * np.log10(signal / noise)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))
