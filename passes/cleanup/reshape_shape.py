"""simplify-reshape-shape: Reshape targets built from Shape ops become constants.

Exporters write ``x.view(b, s, heads, dim)`` as a chain
Shape → Gather → Unsqueeze → Concat feeding Reshape, so dynamic batch and
sequence sizes reach the Reshape at run time. When a piece of that target
picks dim *j* of a value whose dim *j* provably equals dim *j* of the
Reshape's input (the same value, or the same named symbolic dim), ONNX's
Reshape can say it with a constant ``0`` ("copy this dim", allowzero=0).
Once every piece is constant the target is a constant and the Shape chain
dies (eliminate-dead removes it).

When every piece but one is provable that way (a constant or a copied dim)
and the target has no ``-1`` yet, the last dynamic piece becomes ``-1``: for a
valid Reshape it is the one size that makes the element counts agree. (GQA's
``Reshape(expand(k), [b, kv*rep, s, d])``: b is dim 0, kv*rep a constant, s
sits at another position of the 5-D input.) Not done when a constant piece
is 0. onnxruntime cannot infer a -1 next to a dim of size 0, so a tensor with
a zero-size dim (an empty batch) would stop at such a Reshape; kiln accepts
that for the shape math it removes.

A target Concat shared by several Reshapes (q, k and v of one layer after
cse) is rewritten for each Reshape on its own.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from compiler.passes import Pass, PassResult, register
from passes.cleanup import _graphs
from passes.cleanup._shape_inference import Undo, infer_missing_shapes, restore


@register
@dataclasses.dataclass(frozen=True)
class SimplifyReshapeShape(Pass):
    """Turn Reshape targets assembled from Shape lookups into constants with 0 dims."""

    name: ClassVar[str] = "simplify-reshape-shape"
    summary: ClassVar[str] = "Reshape targets built from Shape/Gather/Concat become constants using 0 (copy dim)"

    def call(self, model: ir.Model) -> PassResult:
        candidates = [
            (graph, node)
            for graph in _graphs.graph_likes(model)
            for node in graph
            if node.op_type == "Reshape"
            and _graphs.is_standard(node)
            and (_concat_target(node) is not None or _flattens_to_1d(node))
        ]
        if not candidates:
            return PassResult(model, False)
        undo: Undo = []
        infer_missing_shapes(model, undo, symbolic=True)  # to prove dims equal; annotations go back below
        try:
            rewrites = [(graph, node, target) for graph, node in candidates
                        if (target := _static_target(node)) is not None]
            no_ops = [(graph, node) for graph, node in candidates if _is_no_op(node)]
        finally:
            restore(undo)
        for graph, node, target in rewrites:
            _set_target(graph, node, target)
        for graph, node in no_ops:
            node.outputs[0].replace_all_uses_with(node.inputs[0])
        for graph, node in no_ops:
            _graphs.remove_nodes(graph, [node])
        return PassResult(model, bool(rewrites or no_ops))


def _flattens_to_1d(reshape: ir.Node) -> bool:
    """Reshape(x, [-1]) whose output is not a graph output."""
    return (
        len(reshape.inputs) == 2
        and reshape.inputs[0] is not None
        and _graphs.constant_ints(reshape.inputs[1]) == [-1]
        and not reshape.outputs[0].is_graph_output()
    )


def _is_no_op(reshape: ir.Node) -> bool:
    """Reshape(x, [-1]) of an x that is already 1-D (its inferred rank) does nothing."""
    if not _flattens_to_1d(reshape):
        return False
    shape = reshape.inputs[0].shape
    return shape is not None and len(shape) == 1


def _concat_target(reshape: ir.Node) -> ir.Node | None:
    """The Concat that builds the Reshape's target, when it is used only there."""
    if len(reshape.inputs) != 2 or reshape.attributes.get_int("allowzero", 0) != 0:
        return None
    target = reshape.inputs[1]
    if target is None or _graphs.constant_tensor(target) is not None or target.is_graph_output():
        return None
    concat = target.producer()
    if concat is None or concat.op_type != "Concat" or not _graphs.is_standard(concat):
        return None
    if concat.attributes.get_int("axis", 0) not in (0, -1):
        return None
    return concat


def _static_target(reshape: ir.Node) -> np.ndarray | None:
    concat = _concat_target(reshape)
    data = reshape.inputs[0]
    if concat is None or data is None:
        return None
    dims: list[int] = []
    unknown: list[int] = []  # positions of pieces that are one dynamic size each
    for piece in concat.inputs:
        values = _graphs.constant_ints(piece)
        if values is not None:
            dims.extend(values)
            continue
        picked = _picked_dim(piece)
        if picked is None:
            if not _is_one_size(piece):
                return None
            unknown.append(len(dims))
            dims.append(-1)
            continue
        source, index = picked
        if _same_dim(source, index, data, len(dims)):
            dims.append(0)
        else:
            unknown.append(len(dims))
            dims.append(-1)
    if len(unknown) > 1 or (unknown and (dims.count(-1) > 1 or 0 in _constant_pieces(concat))):
        return None
    return np.array(dims, dtype=np.int64)


def _constant_pieces(concat: ir.Node) -> list[int]:
    return [v for piece in concat.inputs for v in (_graphs.constant_ints(piece) or [])]


def _is_one_size(piece: ir.Value | None) -> bool:
    """Whether ``piece`` is a 1-element int64 vector (one size of the target)."""
    if piece is None or piece.dtype != ir.DataType.INT64 or piece.shape is None:
        return False
    return list(piece.shape) == [1]


def _picked_dim(piece: ir.Value | None) -> tuple[ir.Value, int] | None:
    """(value, dim index) when ``piece`` is Shape(value)[i] as a 1-element 1-D tensor."""
    if piece is None:
        return None
    node = piece.producer()
    if node is not None and node.op_type == "Unsqueeze" and _graphs.is_standard(node):
        axes = _graphs.constant_ints(node.inputs[1]) if len(node.inputs) > 1 else node.attributes.get_ints("axes")
        if list(axes or []) != [0]:
            return None
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
        scalar_index = True
    else:
        scalar_index = False
    if node is None or node.op_type != "Gather" or not _graphs.is_standard(node):
        return None
    if node.attributes.get_int("axis", 0) != 0:
        return None
    index_tensor = _graphs.constant_tensor(node.inputs[1])
    if index_tensor is None or (index_tensor.shape.numpy() != (() if scalar_index else (1,))):
        return None
    shape = node.inputs[0].producer() if node.inputs[0] is not None else None
    if shape is None or shape.op_type != "Shape" or not _graphs.is_standard(shape):
        return None
    if shape.attributes.get_int("start", 0) != 0 or "end" in shape.attributes:
        return None
    index = int(np.asarray(index_tensor.numpy()).reshape(-1)[0])
    if index < 0:
        return None
    return shape.inputs[0], index


def _same_dim(source: ir.Value, i: int, data: ir.Value, j: int) -> bool:
    if source is data:
        return i == j
    a, b = source.shape, data.shape
    if a is None or b is None or i >= len(a) or j >= len(b):
        return False
    da, db = a[i], b[j]
    if isinstance(da, int) and isinstance(db, int):
        return da == db
    name_a, name_b = getattr(da, "value", None), getattr(db, "value", None)
    return isinstance(name_a, str) and name_a == name_b


def _set_target(graph: _graphs.GraphLike, reshape: ir.Node, target: np.ndarray) -> None:
    old = reshape.inputs[1]
    assert old is not None
    value = ir.Value(
        name=f"{reshape.outputs[0].name}_target",
        type=ir.TensorType(ir.DataType.INT64),
        shape=ir.Shape(target.shape),
    )
    constant = ir.Node("", "Constant", inputs=(), attributes=(ir.AttrTensor("value", ir.tensor(target)),),
                       outputs=(value,))
    graph.insert_before(reshape, constant)
    reshape.replace_input_with(1, value)
