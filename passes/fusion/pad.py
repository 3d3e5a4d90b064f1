"""fuse-pad: a constant-mode Pad folded into the pads of the Conv (or
com.microsoft::FusedConv), AveragePool or MaxPool that reads it.

Legal when the Pad pads only spatial dims by non-negative amounts, in
``constant`` mode with the value the consumer pads with: 0 for Conv and for
AveragePool (which then counts padded cells: ``count_include_pad=1``, so its
own pads must be zero unless it already counts them), -inf for MaxPool (whose
indices output must be unused). Consumers with ``auto_pad=SAME_*`` are left
alone; so are AveragePools with ``ceil_mode=1``.
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
    attr_int,
    attr_ints,
    attr_string,
    input_at,
    rank_of,
)

CONSUMERS = ("Conv", "AveragePool", "MaxPool", "com.microsoft::FusedConv")


@dataclasses.dataclass
class _Match:
    node: ir.Node
    pad: ir.Node
    spatial: list[int] | None = None  # the Pad's pads on the spatial dims (begins, ends)


def pad_amounts(pad: ir.Node, ctx: RewriteContext, rank: int) -> list[int] | str:
    """The Pad's pads over all ``rank`` dims (begins then ends), or a reason."""
    if ctx.opset < 11:
        pads = attr_ints(pad, "pads") if ctx.opset >= 2 else attr_ints(pad, "paddings")
        if pads is None:
            return "Pad has no pads"
    else:
        pads = ctx.ints(input_at(pad, 1))
        if pads is None:
            return "Pad pads are not constant"
        axes_value = input_at(pad, 3)
        if axes_value is not None:
            axes = ctx.ints(axes_value)
            if axes is None:
                return "Pad axes are not constant"
            if len(pads) != 2 * len(axes):
                return "Pad pads do not match its axes"
            full = [0] * (2 * rank)
            for i, axis in enumerate(axes):
                axis = axis + rank if axis < 0 else axis
                if not 0 <= axis < rank:
                    return f"Pad axis {axes[i]} is out of range"
                full[axis] = pads[i]
                full[rank + axis] = pads[len(axes) + i]
            pads = full
    if len(pads) != 2 * rank:
        return f"Pad has {len(pads)} pads for a rank-{rank} input"
    return pads


def pad_value(pad: ir.Node, ctx: RewriteContext) -> float | str:
    if ctx.opset < 11:
        attr = pad.attributes.get("value")
        return 0.0 if attr is None else float(attr.as_float())
    value = input_at(pad, 2)
    if value is None:
        return 0.0
    array = ctx.array(value)
    if array is None:
        return "Pad value is not constant"
    if array.size != 1:
        return "Pad value is not a scalar"
    return float(array.reshape(-1)[0])


class PadInto(Rule):
    """Pad(constant) → Conv/AveragePool/MaxPool: the pads move into the consumer."""

    name = "pad-into"
    anchors = CONSUMERS

    def match(self, node: ir.Node, ctx: RewriteContext) -> _Match | None:
        pad = ctx.producer(input_at(node, 0), "Pad")
        return None if pad is None else _Match(node, pad)

    def check(self, m: _Match, ctx: RewriteContext) -> str | None:
        node, pad = m.node, m.pad
        what = node.op_type
        conv_like = what in ("Conv", "FusedConv")
        reason = ctx.sole_user(pad.outputs[0], node, "Pad output")
        if reason:
            return reason
        mode = attr_string(pad, "mode", "constant")
        if mode != "constant":
            return f"Pad mode is {mode}"
        auto_pad = attr_string(node, "auto_pad", "NOTSET")
        if auto_pad not in ("NOTSET", "VALID"):
            return f"{what} auto_pad is {auto_pad}"
        rank = _rank(node)
        if rank is None:
            return f"the rank of the {what} input is unknown"
        pads = pad_amounts(pad, ctx, rank)
        if isinstance(pads, str):
            return pads
        if any(p < 0 for p in pads):
            return "Pad crops (negative pads)"
        if pads[0] or pads[1] or pads[rank] or pads[rank + 1]:
            return "Pad pads the batch or channel dims"
        value = pad_value(pad, ctx)
        if isinstance(value, str):
            return value
        if conv_like:
            if value != 0.0:
                return f"Pad value is {value:g}, not 0"
        elif what == "MaxPool":
            if not (np.isinf(value) and value < 0):
                return f"Pad value is {value:g}; MaxPool pads with -inf"
            if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
                return "MaxPool indices output is used"
        elif value != 0.0:
            return f"Pad value is {value:g}, not 0"
        if what == "AveragePool":
            if attr_int(node, "ceil_mode", 0):
                return "AveragePool ceil_mode=1"
            if attr_int(node, "count_include_pad", 0) == 0 and any(_own_pads(node, rank)):
                return "AveragePool has its own pads and count_include_pad=0"
        m.spatial = pads[2:rank] + pads[rank + 2 :]
        if not conv_like:
            kernel = attr_ints(node, "kernel_shape") or []
            merged = [a + b for a, b in zip(_own_pads(node, rank), m.spatial)]
            if any(p >= k for p, k in zip(merged, kernel + kernel)):
                return f"the merged pads {merged} would not be smaller than the {what} kernel"
        return None

    def rewrite(self, m: _Match, ctx: RewriteContext) -> ir.Node:
        node = m.node
        rank = _rank(node)
        assert rank is not None and m.spatial is not None
        own = _own_pads(node, rank)
        merged = [a + b for a, b in zip(own, m.spatial)]
        node.attributes["pads"] = ir.AttrInt64s("pads", merged)
        if "auto_pad" in node.attributes:
            node.attributes.pop("auto_pad")
        if node.op_type == "AveragePool":
            node.attributes["count_include_pad"] = ir.AttrInt64("count_include_pad", 1)
        ctx.set_input(node, 0, m.pad.inputs[0])
        ctx.kill(m.pad)
        return node


def _rank(node: ir.Node) -> int | None:
    """The rank of the consumer's input (from the kernel or the weight)."""
    kernel = attr_ints(node, "kernel_shape")
    if kernel is not None:
        return len(kernel) + 2
    if node.op_type in ("Conv", "FusedConv"):
        weight = input_at(node, 1)
        if weight is not None and weight.shape is not None:
            return len(weight.shape)
        return rank_of(input_at(node, 0))
    return None


def _own_pads(node: ir.Node, rank: int) -> list[int]:
    if attr_string(node, "auto_pad", "NOTSET") == "VALID":
        return [0] * (2 * (rank - 2))
    return attr_ints(node, "pads") or [0] * (2 * (rank - 2))


@register
@dataclasses.dataclass(frozen=True)
class FusePad(RulePass):
    """Fold constant-mode Pad into the pads of the following Conv/AveragePool/MaxPool."""

    name: ClassVar[str] = "fuse-pad"
    summary: ClassVar[str] = "fold a constant Pad into the pads of the next Conv, AveragePool or MaxPool"

    def rules(self) -> list[Rule]:
        return [PadInto()]
