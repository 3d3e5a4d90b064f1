"""Dequantizers (ggml's dequantize_row_*): (NB, type_size) uint8 blocks -> (NB, block) float32."""

from __future__ import annotations

import numpy as np

F = np.float32


def _h(b: np.ndarray, at: int) -> np.ndarray:
    return np.ascontiguousarray(b[:, at:at + 2]).view(np.float16).astype(F)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """qs (nb, 16) -> (nb, 32): low nibbles then high nibbles."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=1)


def _qh_bits(b: np.ndarray, at: int) -> np.ndarray:
    qh = np.ascontiguousarray(b[:, at:at + 4]).view("<u4")
    return ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def q8_0(b):
    return _h(b, 0) * b[:, 2:].view(np.int8).astype(F)


def q4_0(b):
    return _h(b, 0) * (_nibbles(b[:, 2:]).astype(F) - F(8))


def q4_1(b):
    return _h(b, 0) * _nibbles(b[:, 4:]).astype(F) + _h(b, 2)


def q5_0(b):
    q = _nibbles(b[:, 6:]) | (_qh_bits(b, 2) << 4)
    return _h(b, 0) * (q.astype(F) - F(16))


def q5_1(b):
    q = _nibbles(b[:, 8:]) | (_qh_bits(b, 4) << 4)
    return _h(b, 0) * q.astype(F) + _h(b, 2)


def _unpack2(qs: np.ndarray) -> np.ndarray:
    """(nb, 64) -> (nb, 256) 2-bit values in element order."""
    q = qs.reshape(-1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    return (q & 3).reshape(-1, 256)


def q2_k(b):
    sc = b[:, :16]
    q = _unpack2(b[:, 16:80]).reshape(-1, 16, 16).astype(F)
    d, dmin = _h(b, 80), _h(b, 82)
    dl = (d * (sc & 0xF).astype(F))[:, :, None]
    ml = (dmin * (sc >> 4).astype(F))[:, :, None]
    return (dl * q - ml).reshape(-1, 256)


def q3_k(b):
    nb = b.shape[0]
    hmask, qs, packed, d = b[:, :32], b[:, 32:96], b[:, 96:108], _h(b, 108)
    low = (packed[:, :8] & 0xF, packed[:, :8] >> 4)
    hi = (packed[:, 8:12, None] >> (2 * np.arange(4, dtype=np.uint8))) & 3  # [j%4][j/4]
    scales = np.empty((nb, 16), np.int32)
    for j in range(16):
        lo = low[0][:, j] if j < 8 else low[1][:, j - 8]
        scales[:, j] = (lo | (hi[:, j % 4, j // 4] << 4)).astype(np.int32) - 32
    q = _unpack2(qs).astype(np.int32)
    hb = ((hmask[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1).reshape(nb, 256)
    q = q - np.where(hb == 1, 0, 4)
    return (d * scales.astype(F)).repeat(16, axis=1) * q.astype(F)


def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc.astype(F), mn.astype(F)


def q4_k(b):
    d, dmin = _h(b, 0), _h(b, 2)
    sc, mn = _scale_min_k4(b[:, 4:16])
    qs = b[:, 16:].reshape(-1, 4, 1, 32)
    q = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(-1, 8, 32).astype(F)
    return ((d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]).reshape(-1, 256)


def q5_k(b):
    d, dmin = _h(b, 0), _h(b, 2)
    sc, mn = _scale_min_k4(b[:, 4:16])
    qh = b[:, 16:48]
    qs = b[:, 48:].reshape(-1, 4, 1, 32)
    q = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(-1, 8, 32)
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    q = (q | (high << 4)).astype(F)
    return ((d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]).reshape(-1, 256)


def q6_k(b):
    nb = b.shape[0]
    ql = b[:, :128].reshape(nb, 2, 2, 32)  # [half][first/second 32 bytes][l]
    qh = b[:, 128:192].reshape(nb, 2, 1, 32)
    sc = b[:, 192:208].view(np.int8).astype(F)
    d = _h(b, 208)
    low = np.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
    high = (qh >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3
    q = (low | (high << 4)).astype(F) - F(32)  # (nb, 2, 4, 32)
    return (d * sc).repeat(16, axis=1) * q.reshape(nb, 256)
