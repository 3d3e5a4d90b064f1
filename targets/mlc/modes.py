"""MLC-LLM's quantization modes, and how kiln's own quantization maps onto them.

A mode ``qAfB[_1]`` stores weights in ``A`` bits (0: not quantized) and runs the
model in ``B``-bit floats. ``_1`` is MLC's group quantization: symmetric int4 in
groups of 32 along the input dimension, eight codes packed per uint32 (code
``i`` of a word at bits ``4i``), stored as ``round(w / scale) + 7`` clipped to
[0, 14], with ``scale = max|w| / 7`` per group in the model's float type. The
weight of a linear layer is laid out [N, K/8] (codes) and [N, K/32] (scales),
as MLC-LLM's ``q_weight`` / ``q_scale``; embedding tables the same way along
their rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from compiler.errors import UnsupportedError


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    bits: int  # 0: weights kept in model_dtype
    model_dtype: str  # float32 | float16: activations, KV cache, norms' weights
    group_size: int = 32

    @property
    def quantized(self) -> bool:
        return self.bits > 0

    @property
    def storage_dtype(self) -> str:
        return "uint32"

    @property
    def per_storage(self) -> int:
        return 32 // self.bits if self.bits else 1

    @property
    def max_int(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.bits else 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "model_dtype": self.model_dtype}
        if self.quantized:
            out.update(kind="group-quant", quantize_dtype=f"int{self.bits}", storage_dtype=self.storage_dtype,
                       group_size=self.group_size, linear_weight_layout="NK", quantize_embedding=True,
                       quantize_final_fc=True)
        else:
            out["kind"] = "no-quant"
        return out


MODES: dict[str, Mode] = {
    "q0f32": Mode("q0f32", 0, "float32"),
    "q0f16": Mode("q0f16", 0, "float16"),
    "q4f16_1": Mode("q4f16_1", 4, "float16"),
    "q4f32_1": Mode("q4f32_1", 4, "float32"),
}
DEFAULT = "q0f32"
HINT = ("--emit mlc takes --quantize " + ", ".join(MODES)
        + " (or kiln's w4 with block-size=32, symmetric: q4f32_1; fp16: q0f16)")


def mode_of(scheme: Any) -> Mode:
    """The MLC mode of a ``--quantize`` scheme (None: q0f32)."""
    if scheme is None:
        return MODES[DEFAULT]
    name = getattr(scheme, "name", "")
    if name in MODES:
        return MODES[name]
    if name == "w4" and scheme.block_size == 32 and scheme.symmetric:
        return MODES["q4f32_1"]
    if name == "fp16":
        return MODES["q0f16"]
    raise UnsupportedError(f"--quantize {scheme.spec()} has no MLC encoding", hint=HINT)


def mode_of_record(record: Any, dtype: str = "float32") -> str | None:
    """The MLC mode a kiln QuantRecord on a weight corresponds to (None when none does)."""
    if record is None:
        return None
    if record.bits == 4 and record.block_size == 32 and record.symmetric:
        return "q4f16_1" if dtype == "float16" else "q4f32_1"
    return None
