"""simplify-shape-math: Where of a constant condition, Expand targets built from Shape.

Exporters write torch's ``x.expand(b, kv, rep, s, d)`` (LLaMA's GQA head
repeat) as

    t = Concat(Shape(y)[0], kv, rep, Shape(y)[2], d)
    t = Where(Equal(t, -1), ones, t)        # expand(-1) keeps the input dim
    Expand(x, t)

Once fold-shapes has folded ``Equal(sizes, -1)`` to all-False, the Where
picks ``t`` whatever the sizes are, and an Expand target piece that equals
the aligned dim of ``x`` can be ``1`` (broadcasting keeps that dim). When the
whole target is then constant, the Shape chain dies; an all-ones target no
longer than ``x``'s rank makes the Expand an identity.

- Where(c, a, b) with a constant ``c`` that is all True (all False) becomes
  ``a`` (``b``) when that branch already has the Where's output shape (static
  dims, or the same named dims), so broadcasting changes nothing.
- Expand target pieces ``Unsqueeze(Gather(Shape(v), i))`` whose dim provably
  equals the Expand input's aligned dim become the constant 1.

Shapes come from onnx and onnxruntime symbolic inference, used transiently.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from compiler.passes import Pass, PassResult, register
from passes.cleanup import _graphs
from passes.cleanup._shape_inference import Undo, infer_missing_shapes, restore
from passes.cleanup.reshape_shape import _picked_dim, _same_dim


@register
@dataclasses.dataclass(frozen=True)
class SimplifyShapeMath(Pass):
    """Drop Wheres with a constant condition; make Expand targets constant where dims provably match."""

    name: ClassVar[str] = "simplify-shape-math"
    summary: ClassVar[str] = (
        "Where of a constant all-True/False condition -> its branch; Expand target dims equal to the input's -> 1"
    )

    def call(self, model: ir.Model) -> PassResult:
        wheres = [(g, n) for g in _graphs.graph_likes(model) for n in g if _where_candidate(n) is not None]
        expands = [(g, n) for g in _graphs.graph_likes(model) for n in g if _expand_concat(n) is not None]
        if not wheres and not expands:
            return PassResult(model, False)
        undo: Undo = []
        infer_missing_shapes(model, undo, symbolic=True)
        try:
            where_plan = [(g, n, branch) for g, n in wheres if (branch := _where_branch(n)) is not None]
            expand_plan = [(g, n, target) for g, n in expands if (target := _expand_target(n)) is not None]
            identities = [(g, n) for g, n in expands if _expand_is_identity(n)]
        finally:
            restore(undo)
        for graph, node, branch in where_plan:
            node.outputs[0].replace_all_uses_with(branch)
            _graphs.remove_nodes(graph, [node])
        for graph, node, target in expand_plan:
            _set_constant_input(graph, node, 1, target, "target")
        for graph, node in identities:
            if node.graph is None:
                continue
            node.outputs[0].replace_all_uses_with(node.inputs[0])
            _graphs.remove_nodes(graph, [node])
        return PassResult(model, bool(where_plan or expand_plan or identities))


# ---------------------------------------------------------------- Where


def _where_candidate(node: ir.Node) -> bool | None:
    """True/False: the branch a Where with a constant, uniform condition picks."""
    if node.op_type != "Where" or not _graphs.is_standard(node) or len(node.inputs) != 3:
        return None
    if any(v is None for v in node.inputs) or node.outputs[0].is_graph_output():
        return None
    cond = _graphs.constant_tensor(node.inputs[0])
    if cond is None or cond.dtype != ir.DataType.BOOL:
        return None
    values = np.asarray(cond.numpy()).reshape(-1)
    if values.size == 0 or not (values.all() or not values.any()):
        return None
    return bool(values[0])


def _where_branch(node: ir.Node) -> ir.Value | None:
    pick = _where_candidate(node)
    if pick is None:
        return None
    branch = node.inputs[1] if pick else node.inputs[2]
    out = node.outputs[0]
    assert branch is not None
    if branch.dtype is None or out.dtype is not None and branch.dtype != out.dtype:
        return None
    # The output is the broadcast of all three inputs: the branch must already be it.
    return branch if _broadcast_keeps(branch, list(node.inputs)) else None


def _dims_of(value: ir.Value) -> list | None:
    tensor = _graphs.constant_tensor(value)
    if tensor is not None:
        return [int(d) for d in tensor.shape]
    return None if value.shape is None else list(value.shape)


def _broadcast_keeps(branch: ir.Value, inputs: list) -> bool:
    """Whether broadcasting ``branch`` with every input leaves ``branch``'s shape unchanged."""
    mine = _dims_of(branch)
    if mine is None:
        return False
    for other in inputs:
        if other is branch:
            continue
        dims = _dims_of(other)
        if dims is None or len(dims) > len(mine):
            return False
        for a, b in zip(reversed(mine), reversed(dims)):
            if b == 1 or _equal_dims(a, b):
                continue
            return False
    return True


def _equal_dims(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    name_a, name_b = getattr(a, "value", None), getattr(b, "value", None)
    return isinstance(name_a, str) and name_a == name_b


# ---------------------------------------------------------------- Expand


def _expand_concat(node: ir.Node) -> ir.Node | None:
    """The Concat building an Expand's target, when it has a Shape-picked piece."""
    if node.op_type != "Expand" or not _graphs.is_standard(node) or len(node.inputs) != 2:
        return None
    target = node.inputs[1]
    if node.inputs[0] is None or target is None or target.is_graph_output():
        return None
    concat = target.producer()
    if concat is None or concat.op_type != "Concat" or not _graphs.is_standard(concat):
        return None
    if concat.attributes.get_int("axis", 0) not in (0, -1):
        return None
    if not any(_picked_dim(piece) is not None for piece in concat.inputs):
        return None
    return concat


def _expand_target(node: ir.Node) -> np.ndarray | None:
    """The Expand's target as a constant with 1 for provably kept dims, if all pieces become constant."""
    concat = _expand_concat(node)
    data = node.inputs[0]
    if concat is None or data is None or data.shape is None:
        return None
    pieces: list[list[int] | None] = []
    for piece in concat.inputs:
        values = _graphs.constant_ints(piece)
        pieces.append(values)
        if values is None and _picked_dim(piece) is None:
            return None
    length = sum(len(p) if p is not None else 1 for p in pieces)
    offset = length - len(data.shape)  # target position k meets input dim k - offset
    dims: list[int] = []
    for piece, values in zip(concat.inputs, pieces):
        if values is not None:
            dims.extend(values)
            continue
        source, index = _picked_dim(piece)
        position = len(dims) - offset
        if position < 0 or not _same_dim(source, index, data, position):
            return None
        dims.append(1)
    return np.array(dims, dtype=np.int64)


def _expand_is_identity(node: ir.Node) -> bool:
    """Expand(x, ones) with no more ones than x has dims: x itself."""
    if node.op_type != "Expand" or not _graphs.is_standard(node) or len(node.inputs) != 2:
        return False
    data, out = node.inputs[0], node.outputs[0]
    target = _expand_target(node) if _expand_concat(node) is not None else _graphs.constant_ints(node.inputs[1])
    if target is None or data is None or data.shape is None:
        return False
    if out.is_graph_output():
        return False
    return all(int(v) == 1 for v in target) and len(target) <= len(data.shape)


def _set_constant_input(graph: _graphs.GraphLike, node: ir.Node, index: int, array: np.ndarray, what: str) -> None:
    value = ir.Value(
        name=f"{node.outputs[0].name}_{what}",
        type=ir.TensorType(ir.DataType.INT64),
        shape=ir.Shape(array.shape),
    )
    constant = ir.Node("", "Constant", inputs=(), attributes=(ir.AttrTensor("value", ir.tensor(array)),),
                       outputs=(value,))
    graph.insert_before(node, constant)
    node.replace_input_with(index, value)
