"""infer-types: give untyped intermediate values their element type.

Exporters often write no value_info, so rules that depend on a dtype (a Cast
to the type it already has, dtype checks in fusions) cannot fire. onnx shape
inference fills in the dtype only: inferred *shapes* are put back, because an
over-specific inferred shape can make onnxruntime reject a model it ran before
(see fold-shapes). Element types are what inference gets right.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import onnx_ir as ir

from compiler.passes import Pass, PassResult, register
from passes.cleanup._shape_inference import Undo, infer_missing_shapes


@register
@dataclasses.dataclass(frozen=True)
class InferTypes(Pass):
    """Annotate untyped intermediate values with their inferred element type."""

    name: ClassVar[str] = "infer-types"
    summary: ClassVar[str] = "annotate untyped intermediate values with their element type (shapes untouched)"

    def call(self, model: ir.Model) -> PassResult:
        if not _has_untyped_values(model):
            return PassResult(model, False)
        undo: Undo = []
        infer_missing_shapes(model, undo)
        typed = 0
        for value, old_type, old_shape in undo:
            value.shape = old_shape
            if old_type is None and value.type is not None:
                typed += 1
            else:
                value.type = old_type
        return PassResult(model, typed > 0)


def _has_untyped_values(model: ir.Model) -> bool:
    return any(
        output.type is None
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        for output in node.outputs
    )
