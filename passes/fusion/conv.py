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
    ConsumerAffine,
    PostMatch,
    PreMatch,
    ProducerAffine,
    ProducerBatchNorm,
    batchnorm_affine,
    cast_to,
    f64,
    float_dtype_problem,
    float_weight,
    input_broadcast_problem,
)
from passes.fusion._rules import (
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
    found = float_weight(node, ctx, what, f"{what} weight is not constant")
    if isinstance(found, str):
        return found
    weight, tensor = found
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


class _ConvProducer:
    """Hooks for rules whose Conv/ConvTranspose takes the affine after it."""

    producers = CONV_OPS
    parts_of = staticmethod(conv_parts)
    apply_affine = staticmethod(apply_output_affine)


class ConvOutputAffine(_ConvProducer, ProducerAffine):
    """Conv → Add/Sub/Mul/Div(constant) becomes the Conv with new weight/bias."""

    def set_channels(self, m: PostMatch, parts: ConvParts, affine: Affine, c: np.ndarray) -> str | None:
        return self.set_vectors(m, affine, parts.rank, 1, parts.out_channels)


class ConvBatchNorm(_ConvProducer, ProducerBatchNorm):
    """Conv/ConvTranspose → BatchNormalization (inference) becomes the Conv."""

    name = "conv-batchnorm"

    def channels(self, parts: ConvParts) -> int:
        return parts.out_channels


class BatchNormOutputAffine(ProducerAffine):
    """BatchNormalization → Add/Sub/Mul/Div(per-channel constant) becomes the
    BatchNormalization with a new scale and bias (a BatchNormalization that
    follows no Conv, e.g. pre-activation blocks, still absorbs what follows)."""

    needs_shapes = True
    producers = ("BatchNormalization",)

    def parts_of(self, bn: ir.Node, ctx: RewriteContext) -> tuple[np.ndarray, np.ndarray, ir.DataType] | str:
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
        affine = batchnorm_affine(bn, ctx, tensors[0].size)  # inference mode, statistics unused
        if isinstance(affine, str):
            return affine
        return (tensors[0].numpy().reshape(-1), tensors[1].numpy().reshape(-1), tensors[0].dtype)

    def set_channels(self, m: PostMatch, parts: Any, affine: Affine, c: np.ndarray) -> str | None:
        bn = m.producer
        rank = len(bn.outputs[0].shape) if bn.outputs[0].shape is not None else None
        if rank is None:
            rank = len(bn.inputs[0].shape) if bn.inputs[0] is not None and bn.inputs[0].shape is not None else None
        if rank is None:
            if c.size != 1 or c.ndim > 1:
                return "the rank of the BatchNormalization input is unknown"
            rank = 2
        return self.set_vectors(m, affine, rank, 1, parts[0].size)

    def fold(self, m: PostMatch, ctx: RewriteContext) -> None:
        scale, bias, dtype = m.parts
        scale, bias = f64(scale), f64(bias)
        if m.scale is not None:
            scale, bias = scale * m.scale, bias * m.scale
        if m.shift is not None:
            bias = bias + m.shift
        ctx.replace_constant(m.producer, 1, cast_to(scale, dtype))
        ctx.replace_constant(m.producer, 2, cast_to(bias, dtype))


class ConvInputAffine(ConsumerAffine):
    """Add/Sub/Mul/Div(constant) → Conv: the constant goes into the weight
    (a scale: any Conv or ConvTranspose) or the bias (a shift: an unpadded Conv)."""

    anchors = CONV_OPS
    single_output = False
    parts_of = staticmethod(conv_parts)

    def set_channels(self, m: PreMatch, parts: ConvParts, affine: Affine, c: np.ndarray) -> str | None:
        reason = self.set_vectors(m, affine, parts.rank, 1, parts.in_channels) or input_broadcast_problem(
            m.op.inputs[m.x_index], c, parts.rank, 1 - parts.rank, parts.in_channels, m.op.op_type
        )
        if reason:
            return reason
        if m.shift is not None:
            if parts.transpose:
                return "a constant added before a ConvTranspose does not fold into its bias"
            if _pads_input(m.node):
                return "Conv pads its input: an added constant does not commute with zero padding"
        return None

    def fold_input(self, m: PreMatch, ctx: RewriteContext) -> None:
        parts: ConvParts = m.parts
        dtype = ctx.tensor(parts.weight).dtype  # type: ignore[union-attr]
        if m.shift is not None:
            b = f64(parts.b) if parts.b is not None else np.zeros(parts.out_channels)
            ctx.replace_constant(m.node, 2, cast_to(b + parts.shift_in(m.shift), dtype), hint=_bias_name(parts))
        if m.scale is not None:
            ctx.replace_constant(m.node, 1, cast_to(parts.scale_in(f64(parts.w), m.scale), dtype))


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
