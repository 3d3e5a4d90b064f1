"""The quantize stage's entry for MLC modes (``--quantize q4f16_1`` ...) on ONNX graphs.

LLM checkpoints are encoded by ``targets.mlc.weights`` (MLC's exact layout).
On a graph the mode maps to kiln's canonical quantization, which the package
then stores in the TVM backend's packed form: ``q0f32`` changes nothing,
``q0f16`` is kiln's ``fp16``, ``q4f16_1`` / ``q4f32_1`` are ``w4`` with
symmetric groups of 32 along the input dimension (float32 scales).
"""

from __future__ import annotations

from typing import Any


def apply(scheme: Any, model: Any, ctx: Any) -> list:
    from passes.quantize import schemes

    if scheme.name == "q0f32":
        return []
    if scheme.name == "q0f16":
        from passes.quantize import float16

        return float16.apply(schemes.Float16(), model, ctx)
    from passes.quantize import weight_only

    return weight_only.apply(schemes.WeightOnly4(block_size=32, symmetric=True), model, ctx)
