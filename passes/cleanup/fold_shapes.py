"""fold-shapes: replace Shape and Size of statically shaped values by constants.

When some Shape/Size input lacks the static dims it needs, onnx shape
inference runs once first (best effort; graph inputs/outputs keep their
types). Subgraphs are folded too; functions get Constant nodes since they
have no initializers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from compiler.passes import Pass, PassResult, register
from passes.cleanup import _graphs
from passes.cleanup._shape_inference import Undo, infer_missing_shapes, restore

_SHAPE_OPS = ("Shape", "Size")


@register
@dataclasses.dataclass(frozen=True)
class FoldShapes(Pass):
    """Fold Shape/Size of values whose dims are known."""

    name: ClassVar[str] = "fold-shapes"
    summary: ClassVar[str] = "replace Shape/Size of statically shaped values by constants"

    infer: bool = True

    def call(self, model: ir.Model) -> PassResult:
        candidates = [
            (graph, node)
            for graph in _graphs.graph_likes(model)
            for node in graph
            if node.op_type in _SHAPE_OPS and _graphs.is_standard(node) and _wanted(node)
        ]
        if not candidates:
            return PassResult(model, False)
        # Inferred shapes decide what folds, then the annotations go back as
        # they were: an over-specific inferred value_info can make onnxruntime
        # reject a model it ran before.
        undo: Undo = []
        if self.infer and any(_folded_value(node) is None for _, node in candidates):
            infer_missing_shapes(model, undo)
        try:
            return self._fold(model, candidates)
        finally:
            restore(undo)

    def _fold(self, model: ir.Model, candidates: list) -> PassResult:
        by_graph: dict[_graphs.GraphLike, list[ir.Node]] = {}
        for graph, node in candidates:
            by_graph.setdefault(graph, []).append(node)
        modified = False
        for graph, nodes in by_graph.items():
            as_initializer = _graphs.uses_initializers(model, graph)
            folded, renames = [], []
            for node in nodes:
                array = _folded_value(node)
                if array is None:
                    continue
                output = node.outputs[0]
                new = _graphs.replace_with_constant(
                    graph, node, output, ir.tensor(array), as_initializer=as_initializer
                )
                renames.append((output, new))
                folded.append(node)
            _graphs.remove_nodes(graph, folded)
            _graphs.adopt_names(graph, renames)
            modified |= bool(folded)
        return PassResult(model, modified)


def _wanted(node: ir.Node) -> bool:
    """Whether folding the node is allowed and useful."""
    if len(node.inputs) != 1 or node.inputs[0] is None or len(node.outputs) != 1:
        return False
    if _graphs.has_ref_attrs(node):
        return False
    output = node.outputs[0]
    return bool(output.uses()) and not output.is_graph_output()


def _dims(value: ir.Value) -> list[int | ir.SymbolicDim] | None:
    if value.shape is not None:
        return list(value.shape)
    tensor = _graphs.constant_tensor(value)
    return None if tensor is None else [int(d) for d in tensor.shape]


def _folded_value(node: ir.Node) -> np.ndarray | None:
    """The constant the node computes, when its input's (needed) dims are static."""
    source = node.inputs[0]
    assert source is not None
    dims = _dims(source)
    if dims is None:
        return None
    if node.op_type == "Size":
        if not all(isinstance(d, int) for d in dims):
            return None
        return np.array(math.prod(dims), dtype=np.int64)
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", len(dims))
    wanted = dims[start:end]  # Python slicing clamps exactly as ONNX Shape does
    if not all(isinstance(d, int) for d in wanted):
        return None
    return np.array(wanted, dtype=np.int64)
