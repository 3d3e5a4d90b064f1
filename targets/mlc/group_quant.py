"""MLC's group quantization (``q4f16_1``, ``q4f32_1``; see ``modes``): numpy encoding and the TE kernels.

Encoding runs once at packaging time, in numpy, row by row of a [rows, cols]
weight (a linear layer's [N, K], an embedding's [vocab, dim]); ``cols`` is
padded with zeros to a whole number of groups. The kernels decode in
registers: ``w = (code - 7) * scale``; ``kernels.linear`` reduces ``x @ W^T``
with the weight never materialized in float, ``qtake`` decodes only the rows
an embedding lookup reads. The bit layout (eight codes per uint32, stored
``+7``) is the TVM backend's ``words`` layout (``targets.tvm.quant.pack_words``,
``quant_kernels.word_code``), which graph packages store too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from targets.mlc.modes import Mode
from targets.tvm.quant import pack_words, unpack_words


def groups(cols: int, mode: Mode) -> int:
    return -(-cols // mode.group_size)


def encode(w: np.ndarray, mode: Mode) -> tuple[np.ndarray, np.ndarray]:
    """float [rows, cols] -> (codes uint32 [rows, groups*group/8], scales model_dtype [rows, groups])."""
    rows, cols = w.shape
    g, size = groups(cols, mode), mode.group_size
    padded = np.zeros((rows, g * size), np.float32)
    padded[:, :cols] = w
    blocks = padded.reshape(rows, g, size)
    scale = (np.abs(blocks).max(axis=-1) / mode.max_int).astype(mode.model_dtype)
    s32 = scale.astype(np.float32)
    safe = np.where(s32 > 0, s32, 1.0)[..., None]
    codes = np.clip(np.round(blocks / safe), -mode.max_int, mode.max_int).astype(np.int16)
    return pack_words(codes.reshape(rows, -1)), np.ascontiguousarray(scale)


def decode(packed: np.ndarray, scale: np.ndarray, cols: int, mode: Mode) -> np.ndarray:
    """The inverse of ``encode`` as float32 [rows, cols] (the weight the kernels compute with)."""
    rows = packed.shape[0]
    codes = unpack_words(packed, packed.shape[1] * mode.per_storage).astype(np.float32)
    w = codes.reshape(rows, -1, mode.group_size) * scale.astype(np.float32)[..., None]
    return np.ascontiguousarray(w.reshape(rows, -1)[:, :cols])


def _code(q_weight: Any, row: Any, col: Any, mode: Mode) -> Any:
    from targets.tvm.quant_kernels import word_code

    return word_code(q_weight, row, col)


def qtake(q_weight: Any, q_scale: Any, ids: Any, *, dim: int, mode: Mode) -> Any:
    """TE: rows ``ids`` of a quantized [vocab, dim] table -> [*ids.shape, dim] in the model dtype."""
    from tvm import te

    def body(*i: Any) -> Any:
        row = ids[i[:-1]]
        col = i[-1]
        w = _code(q_weight, row, col, mode).astype("float32") * q_scale[row, col // mode.group_size].astype("float32")
        return w.astype(mode.model_dtype)

    return te.compute([*ids.shape, dim], body, name="q4_take")
