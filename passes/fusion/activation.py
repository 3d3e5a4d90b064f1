"""fuse-conv-activation: Conv (+ Add) + activation → ``com.microsoft::FusedConv``.

FusedConv is an onnxruntime contrib op (CPU, float32):
``Y = activation(Conv(X, W, B) + Z)`` with ``activation`` one of Relu, Tanh,
Sigmoid, LeakyRelu (``activation_params=[alpha]``), Clip (``[min, max]``),
HardSigmoid (``[alpha, beta]``); ``Z`` is optional. Only runtimes with the
contrib ops run it, so the pass does nothing unless ``contrib=true`` (the
target says so); every match is then refused with that reason.

The Add form takes a residual ``Conv(x) + z`` (an Add, or a Sum of two) into
``Z`` when ``z`` has exactly the Conv output's (known) shape.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from compiler.passes import register
from passes.fusion._rules import (
    RewriteContext,
    Rule,
    RulePass,
    attr_float,
    input_at,
    same_dim,
)

CONTRIB_DOMAIN = "com.microsoft"
ACTIVATIONS = ("Relu", "Tanh", "Sigmoid", "LeakyRelu", "Clip", "HardSigmoid")

#: The Conv attributes FusedConv takes over.
_CONV_ATTRIBUTES = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")
_FLOAT_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass
class _Match:
    act: ir.Node
    conv: ir.Node
    add: ir.Node | None = None
    z: ir.Value | None = None
    params: list[float] | None = None


def activation_params(act: ir.Node, ctx: RewriteContext) -> list[float] | str:
    kind = act.op_type
    if kind == "LeakyRelu":
        return [attr_float(act, "alpha", 0.01)]
    if kind == "HardSigmoid":
        return [attr_float(act, "alpha", 0.2), attr_float(act, "beta", 0.5)]
    if kind == "Clip":
        if ctx.opset < 11:
            return [attr_float(act, "min", -_FLOAT_MAX), attr_float(act, "max", _FLOAT_MAX)]
        bounds = []
        for index, label, default in ((1, "min", -_FLOAT_MAX), (2, "max", _FLOAT_MAX)):
            value = input_at(act, index)
            if value is None:
                bounds.append(default)
                continue
            array = ctx.array(value)
            if array is None:
                return f"Clip {label} is not constant"
            if array.size != 1:
                return f"Clip {label} is not a scalar"
            bounds.append(float(array.reshape(-1)[0]))
        return bounds
    return []


class ConvActivation(Rule):
    """Conv → activation (or Conv → Add(z) → activation) becomes FusedConv."""

    def __init__(self, contrib: bool, *, with_add: bool) -> None:
        self.contrib = contrib
        self.with_add = with_add
        self.name = "conv-add-activation" if with_add else "conv-activation"
        self.anchors = ACTIVATIONS
        self.needs_shapes = with_add and contrib

    def match(self, node: ir.Node, ctx: RewriteContext) -> _Match | None:
        if len(node.outputs) != 1:
            return None
        source = input_at(node, 0)
        if not self.with_add:
            conv = ctx.producer(source, "Conv")
            return None if conv is None else _Match(node, conv)
        add = ctx.producer(source, "Add", "Sum")
        if add is None or len(add.inputs) != 2:
            return None
        for index in (0, 1):
            conv = ctx.producer(add.inputs[index], "Conv")
            if conv is not None and add.inputs[1 - index] is not add.inputs[index]:
                return _Match(node, conv, add, add.inputs[1 - index])
        return None

    def check(self, m: _Match, ctx: RewriteContext) -> str | None:
        if not self.contrib:
            return "contrib ops are off (contrib=false): FusedConv is a com.microsoft op"
        conv_out = m.conv.outputs[0]
        if m.add is None:
            reason = ctx.sole_user(conv_out, m.act, "Conv output")
        else:
            reason = ctx.sole_user(conv_out, m.add, "Conv output") or ctx.sole_user(
                m.add.outputs[0], m.act, f"{m.add.op_type} output"
            )
        if reason:
            return reason
        dtype = _dtype(m.conv)
        if dtype is None:
            return "the Conv dtype is unknown"
        if dtype != ir.DataType.FLOAT:
            return f"FusedConv runs float32 only; the Conv is {dtype.name}"
        if m.z is not None:
            reason = _same_shape(conv_out, m.z)
            if reason:
                return reason
        params = activation_params(m.act, ctx)
        if isinstance(params, str):
            return params
        m.params = params
        return None

    def rewrite(self, m: _Match, ctx: RewriteContext) -> None:
        conv = m.conv
        inputs = list(conv.inputs[:3])
        if m.z is not None:
            inputs += [None] * (3 - len(inputs)) + [m.z]
        attributes = [conv.attributes[k] for k in _CONV_ATTRIBUTES if k in conv.attributes]
        attributes.append(ir.AttrString("activation", m.act.op_type))
        if m.params:
            attributes.append(ir.AttrFloat32s("activation_params", m.params))
        ctx.ensure_opset(CONTRIB_DOMAIN, 1)
        fused = ctx.node(
            "FusedConv",
            inputs,
            attributes=attributes,
            before=m.act,
            name_hint=conv.name or "FusedConv",
            domain=CONTRIB_DOMAIN,
        )
        ctx.forward(m.act.outputs[0], fused.outputs[0])
        ctx.kill(m.act)
        if m.add is not None:
            ctx.kill(m.add)
        ctx.kill(conv)
        return None


def _dtype(conv: ir.Node) -> ir.DataType | None:
    for value in (conv.outputs[0], *conv.inputs[:2]):
        if value is not None and value.dtype is not None:
            return value.dtype
        tensor = value.const_value if value is not None else None
        if tensor is not None:
            return tensor.dtype
    return None


def _same_shape(a: ir.Value, b: ir.Value) -> str | None:
    if a.shape is None or b.shape is None:
        return "the shapes of the Conv output and the added value are not both known"
    if len(a.shape) != len(b.shape) or not all(same_dim(x, y) for x, y in zip(a.shape, b.shape)):
        return "the added value does not have the Conv output's shape"
    return None


@register
@dataclasses.dataclass(frozen=True)
class FuseConvActivation(RulePass):
    """Conv (+ Add) + Relu/Tanh/Sigmoid/LeakyRelu/Clip/HardSigmoid → com.microsoft::FusedConv."""

    name: ClassVar[str] = "fuse-conv-activation"
    summary: ClassVar[str] = (
        "Conv (+ residual Add) + activation -> com.microsoft::FusedConv (needs contrib=true)"
    )

    contrib: bool = False

    def rules(self) -> list[Rule]:
        return [ConvActivation(self.contrib, with_add=False), ConvActivation(self.contrib, with_add=True)]
