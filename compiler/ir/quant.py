"""The canonical quantization record carried on weight values.

One form that every backend maps to its own encoding (ONNX QDQ/MatMulNBits,
GGUF blocks, packed TVM weights, MLC shards): quantize once, emit many. The
record is stored as JSON in the value's ``metadata_props`` so it survives
cloning, serialization and ``--dump-ir`` round trips.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

import onnx_ir as ir

KEY = "kiln.quant"


@dataclasses.dataclass(frozen=True)
class QuantRecord:
    """How a weight is (to be) quantized.

    block_size 0 means per-channel along ``axis``; -1 means per-tensor.
    """

    scheme: str
    bits: int
    block_size: int = 0
    axis: int = 0
    symmetric: bool = True
    scale_dtype: str = "float32"
    zero_dtype: str | None = None
    packing: Literal["none", "nibble-lo-first", "nibble-hi-first"] = "none"

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 5, 6, 8):
            raise ValueError(f"unsupported bit width {self.bits}")
        if self.block_size < -1:
            raise ValueError(f"block_size must be -1, 0 or positive, got {self.block_size}")
        if self.symmetric and self.zero_dtype is not None:
            raise ValueError("a symmetric scheme has no zero point")
        if not self.symmetric and self.zero_dtype is None:
            raise ValueError("an affine scheme needs zero_dtype")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> QuantRecord:
        return cls(**json.loads(text))


def get_quant(value: ir.Value) -> QuantRecord | None:
    text = value.metadata_props.get(KEY)
    return QuantRecord.from_json(text) if text else None


def set_quant(value: ir.Value, record: QuantRecord | None) -> None:
    if record is None:
        value.metadata_props.pop(KEY, None)
    else:
        value.metadata_props[KEY] = record.to_json()
