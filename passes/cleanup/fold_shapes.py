"""fold-shapes: replace Shape and Size of statically shaped values by constants.

Gather and Slice of a Shape fold too when the dims they pick are static,
even if other dims are dynamic (Shape(x)[1] of a [batch, 384] value is 384).
So does Equal(shape vector, negative constant): sizes are never negative, so
torch's ``expand(-1)`` test ``Equal(Concat(Shape pieces), [-1, ...])`` is a
constant even when the sizes are dynamic.

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
_PICK_OPS = ("Gather", "Slice")


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
            if _graphs.is_standard(node)
            and (
                (node.op_type in _SHAPE_OPS and _wanted(node))
                or (node.op_type in _PICK_OPS and _wanted_pick(node))
                or (node.op_type == "Equal" and _wanted_equal(node))
            )
        ]
        if not candidates:
            return PassResult(model, False)
        # Inferred shapes decide what folds, then the annotations go back as
        # they were: an over-specific inferred value_info can make onnxruntime
        # reject a model it ran before.
        undo: Undo = []
        if self.infer and any(_folded_value(node) is None for _, node in candidates):
            infer_missing_shapes(model, undo, symbolic=True)
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


def _wanted_pick(node: ir.Node) -> bool:
    """A Gather/Slice reading a Shape output with constant indices (axis 0)."""
    source = node.inputs[0] if node.inputs else None
    producer = source.producer() if source is not None else None
    if producer is None or producer.op_type != "Shape" or not _graphs.is_standard(producer):
        return False
    if len(node.outputs) != 1 or not node.outputs[0].uses() or node.outputs[0].is_graph_output():
        return False
    if any(_graphs.constant_tensor(v) is None for v in node.inputs[1:] if v is not None):
        return False
    return node.op_type != "Gather" or node.attributes.get_int("axis", 0) == 0


_NONNEG = "size"  # an element known to be a tensor size: >= 0, value unknown


def _size_elements(value: ir.Value | None) -> list[int | str] | None:
    """The elements of a 1-D int64 vector assembled from constants and Shape
    lookups: ints where known, ``_NONNEG`` where it is some dim's size."""
    ints = _graphs.constant_ints(value)
    if ints is not None:
        return list(ints)
    node = value.producer() if value is not None else None
    if node is None or not _graphs.is_standard(node):
        return None
    if node.op_type == "Concat" and node.attributes.get_int("axis", 0) in (0, -1):
        out: list[int | str] = []
        for piece in node.inputs:
            elements = _size_elements(piece)
            if elements is None:
                return None
            out.extend(elements)
        return out
    scalar = False
    if node.op_type == "Unsqueeze" and len(node.inputs) == 2:
        if _graphs.constant_ints(node.inputs[1]) != [0]:
            return None
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
        scalar = True
        if node is None or not _graphs.is_standard(node):
            return None
    if node.op_type != "Gather" or node.attributes.get_int("axis", 0) != 0 or len(node.inputs) != 2:
        return None
    source = node.inputs[0].producer() if node.inputs[0] is not None else None
    index = _graphs.constant_tensor(node.inputs[1])
    if source is None or source.op_type != "Shape" or index is None:
        return None
    dims = tuple(index.shape.numpy())
    if dims != () if scalar else len(dims) != 1:
        return None  # Unsqueeze(Gather(scalar index)) or Gather(1-D indices): a 1-D piece
    return [_NONNEG] * (1 if scalar else dims[0])


def _wanted_equal(node: ir.Node) -> bool:
    if len(node.inputs) != 2 or len(node.outputs) != 1 or node.outputs[0].is_graph_output():
        return False
    return any(_graphs.constant_ints(v) is not None for v in node.inputs)


def _equal_value(node: ir.Node) -> np.ndarray | None:
    """Equal(size vector, constant) when every size is compared with a negative number."""
    a, b = node.inputs
    if _graphs.constant_ints(a) is not None:
        a, b = b, a
    sizes, constant = _size_elements(a), _graphs.constant_tensor(b)
    if sizes is None or constant is None or _NONNEG not in sizes:
        return None
    values = np.asarray(constant.numpy()).reshape(-1).astype(np.int64)
    if values.size == 1:
        values = np.repeat(values, len(sizes))
    if values.size != len(sizes) or len(constant.shape) > 1:
        return None
    result = []
    for size, c in zip(sizes, values):
        if size == _NONNEG:
            if c >= 0:
                return None  # a size could equal it
            result.append(False)
        else:
            result.append(size == c)
    return np.array(result, dtype=np.bool_)


def _shape_dims(shape_node: ir.Node) -> list[int | ir.SymbolicDim] | None:
    """The dims a Shape node outputs (after its start/end), known or not."""
    dims = _dims(shape_node.inputs[0]) if shape_node.inputs and shape_node.inputs[0] is not None else None
    if dims is None:
        return None
    start = shape_node.attributes.get_int("start", 0)
    end = shape_node.attributes.get_int("end", len(dims))
    return dims[start:end]


def _picked_value(node: ir.Node) -> np.ndarray | None:
    """Gather/Slice of a Shape output, when every picked dim is static."""
    shape_node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if shape_node is None or shape_node.op_type != "Shape":
        return None  # the Shape itself folded earlier in this run: fold-constants takes it from here
    dims = _shape_dims(shape_node)
    if dims is None:
        return None
    positions = np.arange(len(dims), dtype=np.int64)
    consts = [_graphs.constant_tensor(v) for v in node.inputs[1:]]
    arrays = [None if t is None else np.asarray(t.numpy()).astype(np.int64) for t in consts]
    try:
        if node.op_type == "Gather":
            picked = positions[arrays[0]]
        else:
            starts, ends = arrays[0], arrays[1]
            axes = arrays[2] if len(arrays) > 2 and arrays[2] is not None else np.array([0])
            steps = arrays[3] if len(arrays) > 3 and arrays[3] is not None else np.array([1])
            if list(axes.reshape(-1)) not in ([0], [-1]) or starts.size != 1 or ends.size != 1:
                return None
            start, end, step = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0]), int(steps.reshape(-1)[0])
            if step == 0:
                return None
            # ONNX clamps huge ends (INT64_MAX) like Python slicing does.
            picked = positions[slice(start, end, step)]
    except (IndexError, ValueError, TypeError):
        return None
    values = [dims[int(i)] for i in picked.reshape(-1)]
    if not all(isinstance(d, int) for d in values):
        return None
    return np.array(values, dtype=np.int64).reshape(picked.shape)


def _dims(value: ir.Value) -> list[int | ir.SymbolicDim] | None:
    if value.shape is not None:
        return list(value.shape)
    tensor = _graphs.constant_tensor(value)
    return None if tensor is None else [int(d) for d in tensor.shape]


def _folded_value(node: ir.Node) -> np.ndarray | None:
    """The constant the node computes, when its input's (needed) dims are static."""
    if node.op_type in _PICK_OPS:
        return _picked_value(node)
    if node.op_type == "Equal":
        return _equal_value(node)
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
