"""Fold BatchNormalization and constant affine ops into Conv / ConvTranspose
weights and biases; the passes that bundle these with the Gemm / MatMul rules.

Passes:

- ``fuse-batchnorm``: inference BatchNormalization after Conv, ConvTranspose,
  Gemm or a 2-D MatMul with constant weights becomes new weights and a bias.
- ``fuse-bias``: Add/Sub of a per-output-channel constant after Conv /
  ConvTranspose / Gemm / BatchNormalization goes into the bias; Add/Sub of a per-input-channel
  constant before an unpadded Conv or a Gemm goes into the bias too.
- ``fold-scale-into-weights``: Mul/Div by a per-channel constant after Conv /
  ConvTranspose / Gemm / MatMul scales the output channels of the weight
  (after a BatchNormalization: its scale and bias);
  before them, the input channels.

Every rule needs constant weights (and bias) read by this node only, a
constant operand that broadcasts per channel (never enlarging the value),
and an intermediate value with no other user that is no graph output.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from passes.fusion import linear
from passes.fusion._affine import (
    SCALE_OPS,
    SHIFT_OPS,
    Affine,
    batchnorm_affine,
    binary_affine,
    cast_to,
    channel_vector,
    f64,
    float_dtype_problem,
    input_broadcast_problem,
)
from passes.fusion._rules import (
    MAX_OPERAND_ELEMENTS,
    RewriteContext,
    Rule,
    RulePass,
    attr_int,
    attr_ints,
    attr_string,
    input_at,
)
from compiler.passes import register

CONV_OPS = ("Conv", "ConvTranspose")


# ---------------------------------------------------------------- weights


@dataclasses.dataclass
class ConvParts:
    """A Conv/ConvTranspose node with constant weight (and bias)."""

    node: ir.Node
    weight: ir.Value
    bias: ir.Value | None
    w: np.ndarray
    b: np.ndarray | None
    group: int

    @property
    def transpose(self) -> bool:
        return self.node.op_type == "ConvTranspose"

    @property
    def out_channels(self) -> int:
        return self.w.shape[1] * self.group if self.transpose else self.w.shape[0]

    @property
    def in_channels(self) -> int:
        return self.w.shape[0] if self.transpose else self.w.shape[1] * self.group

    @property
    def rank(self) -> int:
        """The rank of the Conv's input and output (N, C, spatial...)."""
        return self.w.ndim

    def scale_out(self, w: np.ndarray, s: np.ndarray) -> np.ndarray:
        """``w`` with output channel ``m`` multiplied by ``s[m]``."""
        ones = (1,) * (w.ndim - 2)
        if not self.transpose:
            return w * s.reshape((-1, 1) + ones)
        g = self.group
        cin, per_group = w.shape[:2]
        grouped = w.reshape((g, cin // g, per_group) + w.shape[2:])
        return (grouped * s.reshape((g, 1, per_group) + ones)).reshape(w.shape)

    def per_input(self, v: np.ndarray) -> np.ndarray:
        """A per-input-channel vector laid out like the weight's first two axes."""
        if self.transpose:
            return v.reshape((-1, 1))
        out, per_group = self.w.shape[:2]
        g = self.group
        return np.repeat(v.reshape(g, per_group), out // g, axis=0)

    def scale_in(self, w: np.ndarray, s: np.ndarray) -> np.ndarray:
        """``w`` with input channel ``c`` multiplied by ``s[c]``."""
        return w * self.per_input(s).reshape(self.per_input(s).shape + (1,) * (w.ndim - 2))

    def shift_in(self, t: np.ndarray) -> np.ndarray:
        """What adding ``t[c]`` to input channel ``c`` adds to each output channel
        of an unpadded Conv."""
        w = f64(self.w)
        spread = self.per_input(t).reshape(w.shape[:2] + (1,) * (w.ndim - 2))
        return (w * spread).sum(axis=tuple(range(1, w.ndim)))


def conv_parts(node: ir.Node, ctx: RewriteContext) -> ConvParts | str:
    what = node.op_type
    weight = input_at(node, 1)
    tensor = ctx.tensor(weight)
    if weight is None or tensor is None:
        return f"{what} weight is not constant"
    reason = float_dtype_problem(tensor, f"{what} weight") or ctx.exclusive_constant(
        weight, node, f"{what} weight"
    )
    if reason:
        return reason
    w = tensor.numpy()
    group = attr_int(node, "group", 1)
    if w.ndim < 3:
        return f"{what} weight has rank {w.ndim}"
    if group < 1 or w.shape[0] % group:
        return f"{what} group={group} does not divide the weight"
    parts = ConvParts(node, weight, None, w, None, group)
    bias = input_at(node, 2)
    if bias is not None:
        array = ctx.array(bias)
        if array is None:
            return f"{what} bias is not constant"
        reason = ctx.exclusive_constant(bias, node, f"{what} bias")
        if reason:
            return reason
        if array.size != parts.out_channels:
            return f"{what} bias has {array.size} entries for {parts.out_channels} channels"
        parts.bias, parts.b = bias, array.reshape(-1)
    return parts


def apply_output_affine(parts: ConvParts, scale: np.ndarray | None, shift: np.ndarray | None, ctx: RewriteContext) -> None:
    """Make the Conv compute ``scale * conv(x) + shift`` (per output channel)."""
    dtype = ctx.tensor(parts.weight).dtype  # type: ignore[union-attr]
    b = f64(parts.b) if parts.b is not None else np.zeros(parts.out_channels)
    if scale is not None:
        ctx.replace_constant(parts.node, 1, cast_to(parts.scale_out(f64(parts.w), scale), dtype))
        b = b * scale
    if shift is not None:
        b = b + shift
    ctx.replace_constant(parts.node, 2, cast_to(b, dtype), hint=_bias_name(parts))


def _bias_name(parts: ConvParts) -> str:
    if parts.bias is not None and parts.bias.name:
        return parts.bias.name
    return f"{parts.weight.name or parts.node.name or 'conv'}_bias"


# ---------------------------------------------------------------- rules


@dataclasses.dataclass
class _Post:
    op: ir.Node
    conv: ir.Node
    x_index: int
    operand: ir.Value | None
    parts: Any = None
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None


def _pick_producer(op: ir.Node, ctx: RewriteContext, *op_types: str) -> tuple[int, ir.Node] | None:
    """(index, producer) of the input of binary ``op`` made by one of ``op_types``;
    an input whose other operand is constant is preferred."""
    if len(op.inputs) != 2 or len(op.outputs) != 1:
        return None
    found = None
    for index in (0, 1):
        producer = ctx.producer(op.inputs[index], *op_types)
        if producer is None:
            continue
        if ctx.tensor(op.inputs[1 - index]) is not None:
            return index, producer
        found = found or (index, producer)
    return found


class ConvOutputAffine(Rule):
    """Conv → Add/Sub/Mul/Div(constant) becomes the Conv with new weight/bias."""

    def __init__(self, name: str, ops: tuple[str, ...]) -> None:
        self.name = name
        self.anchors = ops

    def match(self, node: ir.Node, ctx: RewriteContext) -> _Post | None:
        picked = _pick_producer(node, ctx, *CONV_OPS)
        if picked is None:
            return None
        index, conv = picked
        return _Post(node, conv, index, node.inputs[1 - index])

    def check(self, m: _Post, ctx: RewriteContext) -> str | None:
        what = m.conv.op_type
        reason = ctx.sole_user(m.conv.outputs[0], m.op, f"{what} output")
        if reason:
            return reason
        parts = conv_parts(m.conv, ctx)
        if isinstance(parts, str):
            return parts
        c = ctx.array(m.operand, limit=MAX_OPERAND_ELEMENTS)
        if c is None:
            return f"the other {m.op.op_type} operand is not constant"
        affine = binary_affine(m.op, m.x_index, c)
        if isinstance(affine, str):
            return affine
        reason = _set_channels(m, affine, parts.rank, 1, parts.out_channels)
        if reason:
            return reason
        m.parts = parts
        return None

    def rewrite(self, m: _Post, ctx: RewriteContext) -> None:
        apply_output_affine(m.parts, m.scale, m.shift, ctx)
        ctx.forward(m.op.outputs[0], m.conv.outputs[0])
        ctx.kill(m.op)
        return None


def _set_channels(m: Any, affine: Affine, rank: int, axis: int, channels: int) -> str | None:
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


class ConvBatchNorm(Rule):
    """Conv/ConvTranspose → BatchNormalization (inference) becomes the Conv."""

    name = "conv-batchnorm"
    anchors = ("BatchNormalization",)

    def match(self, node: ir.Node, ctx: RewriteContext) -> _Post | None:
        conv = ctx.producer(input_at(node, 0), *CONV_OPS)
        return None if conv is None else _Post(node, conv, 0, None)

    def check(self, m: _Post, ctx: RewriteContext) -> str | None:
        what = m.conv.op_type
        reason = ctx.sole_user(m.conv.outputs[0], m.op, f"{what} output")
        if reason:
            return reason
        parts = conv_parts(m.conv, ctx)
        if isinstance(parts, str):
            return parts
        affine = batchnorm_affine(m.op, ctx, parts.out_channels)
        if isinstance(affine, str):
            return affine
        m.parts, m.scale, m.shift = parts, affine.scale, affine.shift
        return None

    def rewrite(self, m: _Post, ctx: RewriteContext) -> None:
        apply_output_affine(m.parts, m.scale, m.shift, ctx)
        ctx.forward(m.op.outputs[0], m.conv.outputs[0])
        ctx.kill(m.op)
        return None


class BatchNormOutputAffine(Rule):
    """BatchNormalization → Add/Sub/Mul/Div(per-channel constant) becomes the
    BatchNormalization with a new scale and bias (a BatchNormalization that
    follows no Conv, e.g. pre-activation blocks, still absorbs what follows)."""

    needs_shapes = True

    def __init__(self, name: str, ops: tuple[str, ...]) -> None:
        self.name = name
        self.anchors = ops

    def match(self, node: ir.Node, ctx: RewriteContext) -> _Post | None:
        picked = _pick_producer(node, ctx, "BatchNormalization")
        if picked is None:
            return None
        index, bn = picked
        return _Post(node, bn, index, node.inputs[1 - index])

    def check(self, m: _Post, ctx: RewriteContext) -> str | None:
        bn = m.conv
        reason = ctx.sole_user(bn.outputs[0], m.op, "BatchNormalization output")
        if reason:
            return reason
        scale, bias = input_at(bn, 1), input_at(bn, 2)
        tensors = [ctx.tensor(scale), ctx.tensor(bias)]
        if scale is None or bias is None or tensors[0] is None or tensors[1] is None:
            return "BatchNormalization scale or bias is not constant"
        reason = (
            float_dtype_problem(tensors[0], "BatchNormalization scale")
            or ctx.exclusive_constant(scale, bn, "BatchNormalization scale")
            or ctx.exclusive_constant(bias, bn, "BatchNormalization bias")
        )
        if reason:
            return reason
        channels = tensors[0].size
        affine = batchnorm_affine(bn, ctx, channels)  # inference mode, statistics unused
        if isinstance(affine, str):
            return affine
        c = ctx.array(m.operand, limit=MAX_OPERAND_ELEMENTS)
        if c is None:
            return f"the other {m.op.op_type} operand is not constant"
        affine = binary_affine(m.op, m.x_index, c)
        if isinstance(affine, str):
            return affine
        rank = len(bn.outputs[0].shape) if bn.outputs[0].shape is not None else None
        if rank is None:
            rank = len(bn.inputs[0].shape) if bn.inputs[0] is not None and bn.inputs[0].shape is not None else None
        if rank is None:
            if c.size != 1 or c.ndim > 1:
                return "the rank of the BatchNormalization input is unknown"
            rank = 2
        reason = _set_channels(m, affine, rank, 1, channels)
        if reason:
            return reason
        m.parts = (tensors[0].numpy().reshape(-1), tensors[1].numpy().reshape(-1), tensors[0].dtype)
        return None

    def rewrite(self, m: _Post, ctx: RewriteContext) -> None:
        bn = m.conv
        scale, bias, dtype = m.parts
        scale, bias = f64(scale), f64(bias)
        if m.scale is not None:
            scale, bias = scale * m.scale, bias * m.scale
        if m.shift is not None:
            bias = bias + m.shift
        ctx.replace_constant(bn, 1, cast_to(scale, dtype))
        ctx.replace_constant(bn, 2, cast_to(bias, dtype))
        ctx.forward(m.op.outputs[0], bn.outputs[0])
        ctx.kill(m.op)
        return None


@dataclasses.dataclass
class _Pre:
    conv: ir.Node
    op: ir.Node
    x_index: int
    parts: Any = None
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None


class ConvInputAffine(Rule):
    """Add/Sub/Mul/Div(constant) → Conv: the constant goes into the weight
    (a scale: any Conv or ConvTranspose) or the bias (a shift: an unpadded Conv)."""

    needs_shapes = True

    def __init__(self, name: str, ops: tuple[str, ...]) -> None:
        self.name = name
        self.ops = ops
        self.anchors = CONV_OPS

    def match(self, node: ir.Node, ctx: RewriteContext) -> _Pre | None:
        op = ctx.producer(input_at(node, 0), *self.ops)
        if op is None or len(op.inputs) != 2:
            return None
        x_index = 0 if ctx.tensor(op.inputs[1]) is not None else 1
        return _Pre(node, op, x_index)

    def check(self, m: _Pre, ctx: RewriteContext) -> str | None:
        what = m.conv.op_type
        reason = ctx.sole_user(m.op.outputs[0], m.conv, f"{m.op.op_type} output")
        if reason:
            return reason
        c = ctx.array(m.op.inputs[1 - m.x_index], limit=MAX_OPERAND_ELEMENTS)
        if c is None:
            return f"the {m.op.op_type} before the {what} has no constant operand"
        parts = conv_parts(m.conv, ctx)
        if isinstance(parts, str):
            return parts
        affine = binary_affine(m.op, m.x_index, c)
        if isinstance(affine, str):
            return affine
        reason = _set_channels(m, affine, parts.rank, 1, parts.in_channels) or input_broadcast_problem(
            m.op.inputs[m.x_index], c, parts.rank, 1 - parts.rank, parts.in_channels, m.op.op_type
        )
        if reason:
            return reason
        if m.shift is not None:
            if parts.transpose:
                return "a constant added before a ConvTranspose does not fold into its bias"
            if _pads_input(m.conv):
                return "Conv pads its input: an added constant does not commute with zero padding"
        m.parts = parts
        return None

    def rewrite(self, m: _Pre, ctx: RewriteContext) -> ir.Node:
        parts: ConvParts = m.parts
        dtype = ctx.tensor(parts.weight).dtype  # type: ignore[union-attr]
        if m.shift is not None:
            b = f64(parts.b) if parts.b is not None else np.zeros(parts.out_channels)
            ctx.replace_constant(m.conv, 2, cast_to(b + parts.shift_in(m.shift), dtype), hint=_bias_name(parts))
        if m.scale is not None:
            ctx.replace_constant(m.conv, 1, cast_to(parts.scale_in(f64(parts.w), m.scale), dtype))
        ctx.set_input(m.conv, 0, m.op.inputs[m.x_index])
        ctx.kill(m.op)
        return m.conv


def _pads_input(conv: ir.Node) -> bool:
    auto_pad = attr_string(conv, "auto_pad", "NOTSET")
    if auto_pad == "VALID":
        return False
    if auto_pad != "NOTSET":
        return True
    return any(attr_ints(conv, "pads") or [])


# ---------------------------------------------------------------- passes


@register
@dataclasses.dataclass(frozen=True)
class FuseBatchNorm(RulePass):
    """Fold inference BatchNormalization into the Conv/ConvTranspose/Gemm/MatMul before it."""

    name: ClassVar[str] = "fuse-batchnorm"
    summary: ClassVar[str] = (
        "fold inference BatchNormalization into the preceding Conv, ConvTranspose, Gemm or 2-D MatMul"
    )

    def rules(self) -> list[Rule]:
        return [ConvBatchNorm(), linear.GemmBatchNorm(), linear.MatMulBatchNorm()]


@register
@dataclasses.dataclass(frozen=True)
class FuseBias(RulePass):
    """Fold Add/Sub of per-channel constants into Conv/ConvTranspose/Gemm biases."""

    name: ClassVar[str] = "fuse-bias"
    summary: ClassVar[str] = (
        "fold constant Add/Sub after Conv/ConvTranspose/Gemm/BatchNormalization "
        "(or before an unpadded Conv, a Gemm) into the bias"
    )

    def rules(self) -> list[Rule]:
        return [
            ConvOutputAffine("conv-add", SHIFT_OPS),
            BatchNormOutputAffine("batchnorm-add", SHIFT_OPS),
            ConvInputAffine("add-conv", SHIFT_OPS),
            linear.GemmOutputAffine("gemm-add", SHIFT_OPS),
            linear.GemmInputAffine("add-gemm", SHIFT_OPS),
        ]


@register
@dataclasses.dataclass(frozen=True)
class FoldScaleIntoWeights(RulePass):
    """Fold Mul/Div by per-channel constants into Conv/ConvTranspose/Gemm/MatMul weights."""

    name: ClassVar[str] = "fold-scale-into-weights"
    summary: ClassVar[str] = (
        "fold constant Mul/Div after Conv/ConvTranspose/Gemm/MatMul/BatchNormalization "
        "(or before Conv/ConvTranspose/Gemm/MatMul) into the weights"
    )

    def rules(self) -> list[Rule]:
        return [
            ConvOutputAffine("conv-mul", SCALE_OPS),
            BatchNormOutputAffine("batchnorm-mul", SCALE_OPS),
            ConvInputAffine("mul-conv", SCALE_OPS),
            linear.GemmOutputAffine("gemm-mul", SCALE_OPS),
            linear.GemmInputAffine("mul-gemm", SCALE_OPS),
            linear.MatMulOutputScale(),
            linear.MatMulInputScale(),
        ]
