"""eliminate-identity: remove nodes that provably pass their input through.

Recognized: Identity; inference Dropout whose mask is unused; Cast/CastLike to
the input's dtype; Reshape to the input's static shape; Expand by ones or
equal dims; Squeeze without axes of a static shape without 1s; Flatten of a
rank-2 value at axis 1; Transpose by the identity permutation; Pad by zeros;
Slice keeping everything; Add/Sub of constant 0 and Mul/Div by constant 1
that broadcast to the input's own shape. (Unsqueeze always adds a dim.)

Graph outputs keep their names and types: when the removed node's output is
a graph output, its input takes over the name, which needs the input to be
produced by a node of the same graph and not be a graph output already.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from compiler.passes import Pass, PassResult, register
from passes.cleanup import _graphs

#: Slice ends at or above this are taken to mean "to the end" of any dim.
_TO_THE_END = 2**31 - 1

#: Constant 0/1 operands larger than this are not inspected.
_MAX_NEUTRAL_ELEMENTS = 1 << 16


@register
@dataclasses.dataclass(frozen=True)
class EliminateIdentity(Pass):
    """Remove no-op nodes, forwarding their input to their users."""

    name: ClassVar[str] = "eliminate-identity"
    summary: ClassVar[str] = "remove Identity and other nodes that provably do nothing"

    def call(self, model: ir.Model) -> PassResult:
        modified = False
        opset = _graphs.default_opset(model)
        for graph in _graphs.graph_likes(model):
            graph_opset = graph.opset_imports.get("", opset)
            removed = [node for node in list(graph) if _try_eliminate(node, graph_opset)]
            _graphs.remove_nodes(graph, removed)
            modified |= bool(removed)
        return PassResult(model, modified)


def _try_eliminate(node: ir.Node, opset: int) -> bool:
    """Forward the node's passed-through input to its output's users; True when done."""
    if not _graphs.is_standard(node) or not node.outputs or _graphs.has_ref_attrs(node):
        return False
    rule = _RULES.get(node.op_type)
    if rule is None:
        return False
    try:
        source = rule(node, opset)
    except (IndexError, TypeError, ValueError):  # a malformed node: leave it alone
        return False
    if source is None:
        return False
    output, *extra = node.outputs
    if any(v.uses() or v.is_graph_output() for v in extra):
        return False
    if output.is_graph_output():
        return _take_over_graph_output(output, source)
    if not _graphs.is_user_visible(source) and not source.is_initializer():
        # Keep what was known about the value under its surviving name.
        if source.type is None and isinstance(output.type, ir.TensorType):
            source.type = ir.TensorType(output.type.dtype)
        if source.shape is None and output.shape is not None:
            source.shape = output.shape
    output.replace_all_uses_with(source)
    return True


def _take_over_graph_output(output: ir.Value, source: ir.Value) -> bool:
    """Make ``source`` the graph output in ``output``'s place, under its name and type."""
    producer = source.producer()
    if producer is None or producer.graph is not output.graph or source.is_graph_output():
        return False
    name, type_, shape = output.name, output.type, output.shape
    output.replace_all_uses_with(source, replace_graph_outputs=True)
    output.name = None
    source.name = name
    if type_ is not None:
        source.type = type_
        source.shape = shape
    if output.metadata_props:
        source.metadata_props.update(output.metadata_props)
    return True


# ---------------------------------------------------------------- rules
# Each rule returns the input the node passes through, or None.

Rule = Callable[[ir.Node, int], "ir.Value | None"]


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _static_dims(value: ir.Value | None) -> list[int] | None:
    if value is None or value.shape is None or not value.shape.is_static():
        return None
    return [int(d) for d in value.shape]


def _ints(node: ir.Node, index: int, attr: str) -> list[int] | None:
    """An int list given as constant input ``index`` or attribute ``attr``."""
    if attr in node.attributes:
        return list(node.attributes[attr].as_ints())
    return _graphs.constant_ints(_input(node, index))


def _attr_ints(node: ir.Node, attr: str) -> list[int] | None:
    return list(node.attributes[attr].as_ints()) if attr in node.attributes else None


def _identity(node: ir.Node, opset: int) -> ir.Value | None:
    return _input(node, 0)


def _dropout(node: ir.Node, opset: int) -> ir.Value | None:
    if opset < 7 and node.attributes.get_int("is_test", 0) != 1:
        return None  # old Dropout trains unless told it is a test
    training = _input(node, 2)
    if training is not None:
        tensor = _graphs.constant_tensor(training)
        if tensor is None or bool(tensor.numpy().reshape(-1)[0]):
            return None
    return _input(node, 0)


def _cast(node: ir.Node, opset: int) -> ir.Value | None:
    source = _input(node, 0)
    if source is None or source.dtype is None:
        return None
    to = node.attributes.get_int("to", -1)
    return source if to == source.dtype else None


def _cast_like(node: ir.Node, opset: int) -> ir.Value | None:
    source, like = _input(node, 0), _input(node, 1)
    if source is None or like is None or source.dtype is None:
        return None
    return source if source.dtype == like.dtype else None


def _reshape(node: ir.Node, opset: int) -> ir.Value | None:
    source = _input(node, 0)
    dims = _static_dims(source)
    shape = _ints(node, 1, "shape")
    if dims is None or shape is None or len(shape) != len(dims):
        return None
    allow_zero = node.attributes.get_int("allowzero", 0)
    for dim, target in zip(dims, shape):
        if target == 0 and not allow_zero:
            continue
        if target != dim and target != -1:
            return None
    if shape.count(-1) > 1:
        return None
    return source


def _expand(node: ir.Node, opset: int) -> ir.Value | None:
    source = _input(node, 0)
    shape = _graphs.constant_ints(_input(node, 1))
    if source is None or source.shape is None or shape is None:
        return None
    return source if _broadcasts_into(shape, source.shape) else None


def _broadcasts_into(dims: list[int], shape: ir.Shape) -> bool:
    """Whether broadcasting ``dims`` against ``shape`` leaves ``shape`` as it is."""
    if len(dims) > len(shape):
        return False
    for dim, target in zip(reversed(dims), reversed(list(shape))):
        if dim != 1 and dim != target:
            return False
    return True


def _squeeze(node: ir.Node, opset: int) -> ir.Value | None:
    source = _input(node, 0)
    dims = _static_dims(source)
    if "axes" in node.attributes or _input(node, 1) is not None:
        return None
    if dims is None or 1 in dims:
        return None
    return source


def _flatten(node: ir.Node, opset: int) -> ir.Value | None:
    source = _input(node, 0)
    if source is None or source.shape is None or len(source.shape) != 2:
        return None
    return source if node.attributes.get_int("axis", 1) in (1, -1) else None


def _transpose(node: ir.Node, opset: int) -> ir.Value | None:
    source = _input(node, 0)
    if source is None:
        return None
    perm = node.attributes.get("perm")
    if perm is None:
        return source if source.shape is not None and len(source.shape) <= 1 else None
    return source if list(perm.as_ints()) == list(range(len(perm.as_ints()))) else None


def _pad(node: ir.Node, opset: int) -> ir.Value | None:
    pads = _ints(node, 1, "pads")
    if pads is None or any(pads):
        return None
    return _input(node, 0)


def _slice(node: ir.Node, opset: int) -> ir.Value | None:
    source = _input(node, 0)
    if source is None or source.shape is None:
        return None
    if opset < 10:
        starts, ends = _attr_ints(node, "starts"), _attr_ints(node, "ends")
        axes, steps = _attr_ints(node, "axes"), None
    else:
        starts, ends = _ints(node, 1, ""), _ints(node, 2, "")
        axes = _ints(node, 3, "") if _input(node, 3) is not None else None
        steps = _ints(node, 4, "") if _input(node, 4) is not None else None
        if (_input(node, 3) is not None and axes is None) or (
            _input(node, 4) is not None and steps is None
        ):
            return None
    if starts is None or ends is None or len(starts) != len(ends):
        return None
    rank = len(source.shape)
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step != 1 or not -rank <= axis < rank:
            return None
        dim = source.shape[axis]
        if start != 0 and not (isinstance(dim, int) and start <= -dim):
            return None
        if end < _TO_THE_END and not (isinstance(dim, int) and end >= dim):
            return None
    return source


def _neutral_operand(neutral: int, positions: tuple[int, ...]) -> Rule:
    """A binary op that is a no-op when the operand at one of ``positions`` is
    a constant equal to ``neutral`` everywhere; the other operand passes."""

    def rule(node: ir.Node, opset: int) -> ir.Value | None:
        if len(node.inputs) != 2:
            return None
        for position in positions:
            constant, source = node.inputs[position], node.inputs[1 - position]
            if source is None:
                continue
            tensor = _graphs.constant_tensor(constant)
            if tensor is None or tensor.size > _MAX_NEUTRAL_ELEMENTS:
                continue
            # A scalar broadcasts into anything, and ONNX makes both operands
            # one dtype, so x*1 is x even when x's shape and dtype are unknown.
            if tensor.shape.numpy() != ():
                if source.shape is None or source.dtype is None or tensor.dtype != source.dtype:
                    continue
                if not _broadcasts_into(list(tensor.shape.numpy()), source.shape):
                    continue
            if np.all(tensor.numpy() == neutral):
                return source
        return None

    return rule


_RULES: dict[str, Rule] = {
    "Identity": _identity,
    "Dropout": _dropout,
    "Cast": _cast,
    "CastLike": _cast_like,
    "Reshape": _reshape,
    "Expand": _expand,
    "Squeeze": _squeeze,
    "Flatten": _flatten,
    "Transpose": _transpose,
    "Pad": _pad,
    "Slice": _slice,
    "Add": _neutral_operand(0, (0, 1)),
    "Sub": _neutral_operand(0, (1,)),
    "Mul": _neutral_operand(1, (0, 1)),
    "Div": _neutral_operand(1, (1,)),
}
