"""What every scheme implementation receives and returns.

A scheme implementation is ``apply(scheme, model, ctx) -> list[LayerRecord]``:
it rewrites ``model`` in place into kiln's canonical quantized form (standard
ONNX: DequantizeLinear of integer weights, QuantizeLinear/DequantizeLinear
pairs on activations, float16 casts), records each weight's ``QuantRecord``,
and keeps the output value name of every node it quantizes (the report
compares those values against the float model).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import onnx_ir as ir

from compiler.progress import Progress


@dataclasses.dataclass
class LayerRecord:
    """One quantized (or deliberately kept) layer."""

    node: str  # node name in the main graph
    op: str
    scheme: str  # the scheme's spec, or "float32" when kept at full precision
    output: str  # the node's output value name (unchanged by quantization)
    weight: str | None = None
    bytes_before: int = 0
    bytes_after: int = 0
    note: str = ""
    # filled by the report: error of ``output`` vs the float model on evaluation data
    sqnr_db: float | None = None
    cosine: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and v != ""}


@dataclasses.dataclass
class QuantContext:
    """Inputs of a scheme implementation besides the model."""

    spec: Any  # targets.triple.TargetSpec
    calibration: Any = None  # passes.quantize.calibration.CalibrationSet (the calibration split) or None
    #: node names to leave in float (the accuracy budget's fallback set, or user exclusions)
    exclude: frozenset[str] = frozenset()
    quiet: bool = True
    log: Callable[[str], None] = lambda _msg: None

    def progress(self, label: str, total: int | None = None) -> Progress:
        return Progress(label, total, quiet=self.quiet)


def ensure_node_names(graph: ir.Graph) -> None:
    """Give every unnamed node of the main graph a unique name (records refer to nodes by name)."""
    taken = {node.name for node in graph if node.name}
    counter = 0
    for node in graph:
        if not node.name:
            while f"{node.op_type}_{counter}" in taken:
                counter += 1
            node.name = f"{node.op_type}_{counter}"
            taken.add(node.name)
