"""Per-channel affine maps (y = scale * x + shift) that the weight-folding
rules move into Conv / ConvTranspose / Gemm / MatMul weights and biases.

Arithmetic is done in float64 and cast back to the weight's dtype once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from passes.fusion._rules import MAX_OPERAND_ELEMENTS, RewriteContext, Rule, attr_float, attr_int, input_at

FLOAT_DTYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
)

#: Binary ops that are affine in one operand when the other is constant.
AFFINE_OPS = ("Add", "Sub", "Mul", "Div")
SHIFT_OPS = ("Add", "Sub")
SCALE_OPS = ("Mul", "Div")


@dataclasses.dataclass
class Affine:
    """``y = scale * x + shift``; either part may be absent. Arrays keep the
    constant operand's shape (broadcasting against x), in float64."""

    scale: np.ndarray | None = None
    shift: np.ndarray | None = None


def f64(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float64)


def cast_to(array: np.ndarray, dtype: ir.DataType) -> np.ndarray:
    return np.asarray(array).astype(dtype.numpy())


def float_dtype_problem(tensor: ir.TensorProtocol, what: str) -> str | None:
    if tensor.dtype not in FLOAT_DTYPES:
        return f"{what} has dtype {tensor.dtype.name}; only floating-point weights are folded"
    return None


def float_weight(node: ir.Node, ctx: RewriteContext, what: str, missing: str) -> tuple[ir.Value, ir.TensorProtocol] | str:
    """``node``'s input 1, a floating-point constant read by ``node`` only
    (``what`` names the op in reasons; ``missing`` is the reason when it is not
    constant)."""
    weight = input_at(node, 1)
    tensor = ctx.tensor(weight)
    if weight is None or tensor is None:
        return missing
    reason = float_dtype_problem(tensor, f"{what} weight") or ctx.exclusive_constant(
        weight, node, f"{what} weight"
    )
    return reason or (weight, tensor)


def binary_affine(op: ir.Node, x_index: int, constant: np.ndarray) -> Affine | str:
    """The affine map ``op`` applies to its input ``x_index`` when the other
    input is ``constant``; a reason when it is not affine in that input."""
    c = f64(constant)
    kind = op.op_type
    if kind == "Add":
        return Affine(shift=c)
    if kind == "Sub":
        return Affine(shift=-c) if x_index == 0 else Affine(scale=np.array(-1.0), shift=c)
    if kind == "Mul":
        return Affine(scale=c)
    if kind == "Div":
        if x_index != 0:
            return "Div divides a constant by the value (not affine)"
        if not np.all(c != 0):
            return "the Div divisor has zeros"
        return Affine(scale=1.0 / c)
    return f"{kind} is not an affine op"


def channel_vector(
    c: np.ndarray, rank: int, axis: int, channels: int, what: str
) -> np.ndarray | str:
    """``c``, broadcast against a value of ``rank`` dims, as a [channels]
    vector when it varies along ``axis`` only; else a reason.

    Refuses constants whose broadcast would enlarge the value (higher rank or
    more entries along an axis), so folding never changes a shape.
    """
    if c.ndim > rank:
        return f"{what} has rank {c.ndim}, more than the {rank} dims it applies to"
    shape = (1,) * (rank - c.ndim) + tuple(c.shape)
    for i, dim in enumerate(shape):
        if i == axis:
            if dim not in (1, channels):
                return f"{what} has {dim} entries along the channel axis, expected {channels} or 1"
        elif dim != 1:
            return f"{what} is not per-channel (it varies along axis {i - rank})"
    return np.broadcast_to(f64(c).reshape(-1), (channels,)).copy()


def batchnorm_affine(bn: ir.Node, ctx: RewriteContext, channels: int) -> Affine | str:
    """BatchNormalization in inference mode as an affine map over ``channels``
    (the channel axis is 1); a reason when it is in training mode, its
    statistics outputs are used, or its parameters are not constant."""
    opset = ctx.opset
    if opset < 7 and attr_int(bn, "is_test", 0) != 1:
        return "BatchNormalization is in training mode (is_test=0)"
    if opset < 9 and attr_int(bn, "spatial", 1) != 1:
        return "BatchNormalization normalizes per activation (spatial=0)"
    if attr_int(bn, "training_mode", 0) != 0:
        return "BatchNormalization is in training mode (training_mode=1)"
    if any(v.uses() or v.is_graph_output() for v in bn.outputs[1:]):
        return "BatchNormalization statistics outputs are used"
    params = []
    for index, label in enumerate(("scale", "bias", "mean", "variance"), start=1):
        array = ctx.array(input_at(bn, index))
        if array is None:
            return f"BatchNormalization {label} is not constant"
        array = f64(array).reshape(-1) if array.size in (1, channels) else None
        if array is None:
            return f"BatchNormalization {label} does not have {channels} channels"
        params.append(np.broadcast_to(array, (channels,)))
    scale, bias, mean, var = params
    eps = attr_float(bn, "epsilon", 1e-5)
    factor = scale / np.sqrt(var + eps)
    return Affine(scale=factor, shift=bias - mean * factor)


def input_broadcast_problem(
    x: "ir.Value", c: np.ndarray, rank: int | None, axis: int, channels: int, what: str
) -> str | None:
    """A reason when ``x ⊙ c`` (``c`` a per-channel constant, ``axis`` counted
    from the end) could be larger than ``x`` itself; folding ``c`` into the
    next node's weights needs the node to see exactly ``x``'s shape.

    ``rank`` is the rank the consumer needs (None: any rank works).
    """
    if c.size == 1 and c.ndim <= 1:
        return None
    shape = x.shape
    if shape is None:
        return f"the shape of the {what} input is unknown"
    if rank is not None and len(shape) != rank:
        return f"the {what} input has rank {len(shape)}, the consumer needs {rank}"
    if c.ndim > len(shape):
        return f"the {what} constant has more dims than its input"
    channel_dim = c.shape[axis] if c.ndim >= -axis else 1
    if channel_dim != 1 and shape[axis] != channels:
        return f"the {what} input does not have {channels} channels (the constant would broadcast it)"
    return None


# ---------------------------------------------------------------- rule skeletons
#
# The weight-folding rules of conv.py and linear.py share their shape: a
# producer (Conv, Gemm, MatMul, BatchNormalization) followed by an affine op
# (a BatchNormalization or a binary op with a constant), or a binary affine op
# before a consumer. The classes below hold that shape; a concrete rule names
# its producer / consumer ops and fills in the hooks.


@dataclasses.dataclass
class PostMatch:
    """``op`` reads ``producer``'s output as its input ``x_index``; ``operand``
    is its other input (None for a BatchNormalization)."""

    op: ir.Node
    producer: ir.Node
    x_index: int
    operand: ir.Value | None
    parts: Any = None
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None


@dataclasses.dataclass
class PreMatch:
    """Binary ``op`` (its input ``x_index`` the value, the other a constant)
    feeds input 0 of ``node``."""

    node: ir.Node
    op: ir.Node
    x_index: int
    parts: Any = None
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None


def pick_producer(op: ir.Node, ctx: RewriteContext, *op_types: str) -> PostMatch | None:
    """The input of binary ``op`` made by one of ``op_types``; an input whose
    other operand is constant is preferred."""
    if len(op.inputs) != 2 or len(op.outputs) != 1:
        return None
    found = None
    for index in (0, 1):
        producer = ctx.producer(op.inputs[index], *op_types)
        if producer is None:
            continue
        candidate = PostMatch(op, producer, index, op.inputs[1 - index])
        if ctx.tensor(op.inputs[1 - index]) is not None:
            return candidate
        found = found or candidate
    return found


class _FoldRule(Rule):
    """The hooks shared by the skeletons: ``parts_of`` reads the node whose
    weights change (or says why not); ``set_channels`` stores the affine's
    parts in the match (or says why they do not fold). ``name`` and ``ops``
    given to the constructor set the rule's name and the attribute named by
    ``ops_attribute``."""

    ops_attribute = "anchors"

    def __init__(self, name: str | None = None, ops: tuple[str, ...] | None = None) -> None:
        if name is not None:
            self.name = name
        if ops is not None:
            setattr(self, self.ops_attribute, ops)

    def parts_of(self, node: ir.Node, ctx: RewriteContext) -> Any | str:
        raise NotImplementedError

    def set_channels(self, m: Any, parts: Any, affine: Affine, c: np.ndarray) -> str | None:
        raise NotImplementedError

    def take_binary(self, m: Any, parts: Any, c: np.ndarray) -> str | None:
        """Store ``parts`` and the affine of binary ``m.op`` (its other input
        ``c``) in ``m``, or say why they do not fold."""
        affine = binary_affine(m.op, m.x_index, c)
        if isinstance(affine, str):
            return affine
        reason = self.set_channels(m, parts, affine, c)
        if reason:
            return reason
        m.parts = parts
        return None

    def set_vectors(self, m: Any, affine: Affine, rank: int, axis: int, channels: int) -> str | None:
        """Store the affine's parts in ``m`` as [channels] vectors, or say why not."""
        what = f"the {m.op.op_type} constant"
        for part in ("scale", "shift"):
            array = getattr(affine, part)
            if array is None:
                continue
            vector = channel_vector(array, rank, axis, channels, what)
            if isinstance(vector, str):
                return vector
            setattr(m, part, vector)
        return None


class _ProducerRule(_FoldRule):
    """A producer (one of ``producers``) followed by the anchored affine op,
    which goes away. ``fold`` makes the producer compute
    ``m.scale * y + m.shift``: by default ``apply_affine(m.parts, m.scale,
    m.shift, ctx)``."""

    producers: tuple[str, ...] = ()

    def apply_affine(self, parts: Any, scale: np.ndarray | None, shift: np.ndarray | None, ctx: RewriteContext) -> None:
        raise NotImplementedError

    def fold(self, m: PostMatch, ctx: RewriteContext) -> None:
        self.apply_affine(m.parts, m.scale, m.shift, ctx)

    def producer_parts(self, m: PostMatch, ctx: RewriteContext) -> Any | str:
        """The producer's parts, or why it cannot change: it has another user."""
        reason = ctx.sole_user(m.producer.outputs[0], m.op, f"{m.producer.op_type} output")
        return reason or self.parts_of(m.producer, ctx)

    def rewrite(self, m: PostMatch, ctx: RewriteContext) -> ir.Node | None:
        self.fold(m, ctx)
        ctx.forward(m.op.outputs[0], m.producer.outputs[0])
        ctx.kill(m.op)
        return None


class ProducerBatchNorm(_ProducerRule):
    """Producer (one of ``producers``) → BatchNormalization (inference) becomes
    the producer with new weights; ``channels`` counts its output channels."""

    anchors = ("BatchNormalization",)

    def channels(self, parts: Any) -> int:
        raise NotImplementedError

    def match(self, node: ir.Node, ctx: RewriteContext) -> PostMatch | None:
        producer = ctx.producer(input_at(node, 0), *self.producers)
        return None if producer is None else PostMatch(node, producer, 0, None)

    def check(self, m: PostMatch, ctx: RewriteContext) -> str | None:
        parts = self.producer_parts(m, ctx)
        if isinstance(parts, str):
            return parts
        affine = batchnorm_affine(m.op, ctx, self.channels(parts))
        if isinstance(affine, str):
            return affine
        m.parts, m.scale, m.shift = parts, affine.scale, affine.shift
        return None


class ProducerAffine(_ProducerRule):
    """Producer (one of ``producers``) → Add/Sub/Mul/Div (the ``anchors``) by a
    constant becomes the producer with new weights."""

    def match(self, node: ir.Node, ctx: RewriteContext) -> PostMatch | None:
        return pick_producer(node, ctx, *self.producers)

    def check(self, m: PostMatch, ctx: RewriteContext) -> str | None:
        parts = self.producer_parts(m, ctx)
        if isinstance(parts, str):
            return parts
        c = ctx.array(m.operand, limit=MAX_OPERAND_ELEMENTS)
        if c is None:
            return f"the other {m.op.op_type} operand is not constant"
        return self.take_binary(m, parts, c)


class ConsumerAffine(_FoldRule):
    """Add/Sub/Mul/Div (one of ``ops``) by a constant → consumer (the
    ``anchors``): the constant goes into the consumer's weights;
    ``fold_input`` rewrites them."""

    needs_shapes = True
    ops: tuple[str, ...] = ()
    ops_attribute = "ops"
    #: Whether ``match`` refuses an affine op with more than one output.
    single_output = True

    def fold_input(self, m: PreMatch, ctx: RewriteContext) -> None:
        raise NotImplementedError

    def match(self, node: ir.Node, ctx: RewriteContext) -> PreMatch | None:
        op = ctx.producer(input_at(node, 0), *self.ops)
        if op is None or len(op.inputs) != 2 or (self.single_output and len(op.outputs) != 1):
            return None
        return PreMatch(node, op, 0 if ctx.tensor(op.inputs[1]) is not None else 1)

    def check(self, m: PreMatch, ctx: RewriteContext) -> str | None:
        reason = ctx.sole_user(m.op.outputs[0], m.node, f"{m.op.op_type} output")
        if reason:
            return reason
        c = ctx.array(m.op.inputs[1 - m.x_index], limit=MAX_OPERAND_ELEMENTS)
        if c is None:
            return f"the {m.op.op_type} before the {m.node.op_type} has no constant operand"
        parts = self.parts_of(m.node, ctx)
        if isinstance(parts, str):
            return parts
        return self.take_binary(m, parts, c)

    def rewrite(self, m: PreMatch, ctx: RewriteContext) -> ir.Node:
        self.fold_input(m, ctx)
        ctx.set_input(m.node, 0, m.op.inputs[m.x_index])
        ctx.kill(m.op)
        return m.node
