"""The quantize stage's entry for MLC modes (``--quantize q4f16_1`` ...) on ONNX graphs.

LLM checkpoints are encoded by ``targets.mlc.weights`` (MLC's exact layout).
On a graph the mode maps to kiln's canonical quantization, which the package
then stores in MLC's layout (``targets.mlc.graph``): ``q0f32`` changes
nothing, ``q0f16`` is kiln's ``fp16``, ``q4f16_1`` / ``q4f32_1`` are ``w4``
with symmetric groups of 32 along the input dimension, rounded as MLC rounds:
``scale = max|w| / 7`` in the mode's float type (``q4f16_1``: float16 values,
kept in float32 tensors in the IR so onnxruntime computes the same weights),
codes ``round(w / scale)`` in [-7, 7].
"""

from __future__ import annotations

from typing import Any

import numpy as np


def mlc_round(use: Any, scheme: Any, half: bool) -> tuple[np.ndarray, np.ndarray, None]:
    """Codes and scales of one weight as MLC's group quantization computes them (``half``: float16 scales)."""
    from passes.quantize import numerics, weight_only

    axis, block = weight_only.layout(use, scheme)
    w = use.array.astype(np.float32)
    scale, _ = numerics.compute_params(w, bits=4, axis=axis, block_size=block, symmetric=True)
    if half:
        scale = scale.astype(np.float16).astype(np.float32)
        scale[scale == 0] = 1.0  # a group too small for float16 (|w| < 2e-7): its codes round to 0
    q = numerics.quantize(w, scale, None, bits=4, axis=axis, block_size=block, symmetric=True)
    return np.clip(q, -7, 7).astype(q.dtype), scale, None


def apply(scheme: Any, model: Any, ctx: Any) -> list:
    from passes.quantize import schemes

    if scheme.name == "q0f32":
        return []
    if scheme.name == "q0f16":
        from passes.quantize import float16

        return float16.apply(schemes.Float16(), model, ctx)
    from passes.quantize import weight_only

    half = scheme.name == "q4f16_1"
    return weight_only.apply(schemes.WeightOnly4(block_size=32, symmetric=True), model, ctx,
                             solver=lambda use, w4: mlc_round(use, w4, half))
