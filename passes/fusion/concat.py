"""simplify-concat-slice: Concat / Split / Slice simplifications.

- A Concat of one input is that input.
- A Concat input made by another Concat on the same axis (read by nothing
  else) is replaced by that Concat's inputs.
- A Slice (step 1, one axis: the Concat's) that selects exactly one input of
  a Concat is that input (the Concat stays while others read it).
- A run of a Concat's inputs that is every output of one Split, in order, on
  the same axis, is the Split's input.
- Slices (step 1, one axis) of one value that together cut its whole axis into
  pieces, without gaps or overlap, are one Split (rotate_half's ``x[..., :h]``
  and ``x[..., h:]``). Needs the axis size, from shape inference.
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
    input_at,
    rank_of,
)

#: Slice ends at or beyond this mean "to the end".
_INT_MAX = 2**31 - 1


@dataclasses.dataclass
class _Match:
    node: ir.Node
    data: object = None


def _rank_around(node: ir.Node) -> int | None:
    """The rank of a Concat/Split/Slice's data (all inputs and outputs share it)."""
    for value in (*node.inputs, *node.outputs):
        rank = rank_of(value)
        if rank is not None:
            return rank
    return None


def _same_axis(a: int, b: int, rank: int | None) -> bool | None:
    """Whether two axes are the same (None when it depends on an unknown rank)."""
    if (a < 0) == (b < 0):
        return a == b
    if rank is None:
        return None
    return (a % rank) == (b % rank)


def _set_inputs(node: ir.Node, inputs: list[ir.Value | None]) -> None:
    node.resize_inputs(0)
    node.resize_inputs(len(inputs))
    for i, value in enumerate(inputs):
        node.replace_input_with(i, value)


class ConcatSingle(Rule):
    name = "concat-single"
    anchors = ("Concat",)

    def match(self, node: ir.Node, ctx: RewriteContext) -> _Match | None:
        return _Match(node) if len(node.inputs) == 1 and node.inputs[0] is not None else None

    def check(self, m: _Match, ctx: RewriteContext) -> str | None:
        return ctx.forward_problem(m.node.outputs[0], m.node.inputs[0])  # type: ignore[arg-type]

    def rewrite(self, m: _Match, ctx: RewriteContext) -> None:
        ctx.forward(m.node.outputs[0], m.node.inputs[0])  # type: ignore[arg-type]
        ctx.kill(m.node)
        return None


class ConcatConcat(Rule):
    name = "concat-concat"
    anchors = ("Concat",)
    needs_shapes = True

    def match(self, node: ir.Node, ctx: RewriteContext) -> _Match | None:
        inner = [ctx.producer(v, "Concat") for v in node.inputs]
        return _Match(node) if any(n is not None and n is not node for n in inner) else None

    def check(self, m: _Match, ctx: RewriteContext) -> str | None:
        axis = attr_int(m.node, "axis", 0)
        rank = _rank_around(m.node)
        spliced: list[ir.Value | None] = []
        fused: list[ir.Node] = []
        first_reason = None
        for value in m.node.inputs:
            inner = ctx.producer(value, "Concat")
            reason = None
            if inner is None:
                spliced.append(value)
                continue
            same = _same_axis(attr_int(inner, "axis", 0), axis, rank)
            if same is None:
                reason = "the Concat axes differ in sign and the rank is unknown"
            elif not same:
                reason = "the inner Concat joins another axis"
            else:
                reason = ctx.sole_user(inner.outputs[0], m.node, "inner Concat output")
            if reason:
                first_reason = first_reason or reason
                spliced.append(value)
                continue
            spliced.extend(inner.inputs)
            if inner not in fused:
                fused.append(inner)
        if not fused:
            return first_reason or "nothing to splice"
        m.data = (spliced, fused)
        return None

    def rewrite(self, m: _Match, ctx: RewriteContext) -> ir.Node:
        spliced, fused = m.data  # type: ignore[misc]
        _set_inputs(m.node, spliced)
        ctx.kill(*fused)
        return m.node


def _slice_params(node: ir.Node, ctx: RewriteContext) -> tuple[list[int], list[int], list[int] | None, list[int] | None] | str:
    if ctx.opset < 10:
        starts, ends = attr_ints(node, "starts"), attr_ints(node, "ends")
        axes, steps = attr_ints(node, "axes"), None
    else:
        starts, ends = ctx.ints(input_at(node, 1)), ctx.ints(input_at(node, 2))
        axes = ctx.ints(input_at(node, 3)) if input_at(node, 3) is not None else None
        steps = ctx.ints(input_at(node, 4)) if input_at(node, 4) is not None else None
        if (input_at(node, 3) is not None and axes is None) or (input_at(node, 4) is not None and steps is None):
            return "the Slice axes or steps are not constant"
    if starts is None or ends is None:
        return "the Slice starts or ends are not constant"
    return starts, ends, axes, steps


class SliceConcat(Rule):
    name = "slice-concat"
    anchors = ("Slice",)
    needs_shapes = True

    def match(self, node: ir.Node, ctx: RewriteContext) -> _Match | None:
        concat = ctx.producer(input_at(node, 0), "Concat")
        return None if concat is None else _Match(node, concat)

    def check(self, m: _Match, ctx: RewriteContext) -> str | None:
        concat: ir.Node = m.data  # type: ignore[assignment]
        params = _slice_params(m.node, ctx)
        if isinstance(params, str):
            return params
        starts, ends, axes, steps = params
        if len(starts) != 1 or len(ends) != 1:
            return "the Slice cuts more than one axis"
        if steps is not None and steps != [1]:
            return "the Slice step is not 1"
        slice_axis = axes[0] if axes else 0
        rank = _rank_around(concat)
        same = _same_axis(slice_axis, attr_int(concat, "axis", 0), rank)
        if same is None:
            return "the Slice and Concat axes differ in sign and the rank is unknown"
        if not same:
            return "the Slice cuts another axis than the Concat joins"
        sizes = []
        axis = attr_int(concat, "axis", 0)
        for value in concat.inputs:
            shape = value.shape if value is not None else None
            dim = shape[axis] if shape is not None and -len(shape) <= axis < len(shape) else None
            if not isinstance(dim, int):
                return "the Concat input sizes along the axis are unknown"
            sizes.append(dim)
        total = sum(sizes)
        start, end = (_clamp(v, total) for v in (starts[0], ends[0]))
        offset = 0
        for value, size in zip(concat.inputs, sizes):
            if size > 0 and offset == start and offset + size == end:
                reason = ctx.forward_problem(m.node.outputs[0], value)  # type: ignore[arg-type]
                if reason:
                    return reason
                m.data = (concat, value)
                return None
            offset += size
        return "the Slice does not select exactly one Concat input"

    def rewrite(self, m: _Match, ctx: RewriteContext) -> None:
        concat, value = m.data  # type: ignore[misc]
        ctx.forward(m.node.outputs[0], value)
        ctx.kill(m.node)
        ctx.kill_if_unused(concat)
        return None


def _clamp(index: int, size: int) -> int:
    if index < 0:
        index += size
    return max(0, min(index, size))


class SplitConcat(Rule):
    name = "split-concat"
    anchors = ("Concat",)
    needs_shapes = True

    def match(self, node: ir.Node, ctx: RewriteContext) -> _Match | None:
        return _Match(node) if any(ctx.producer(v, "Split") for v in node.inputs) else None

    def check(self, m: _Match, ctx: RewriteContext) -> str | None:
        inputs = list(m.node.inputs)
        axis = attr_int(m.node, "axis", 0)
        rank = _rank_around(m.node)
        i = 0
        reason = None
        while i < len(inputs):
            split = ctx.producer(inputs[i], "Split")
            outputs = list(split.outputs) if split is not None else []
            if split is None or inputs[i] is not outputs[0]:
                i += 1
                continue
            if inputs[i : i + len(outputs)] != outputs:
                reason = reason or "the Concat does not take every Split output in order"
                i += 1
                continue
            same = _same_axis(attr_int(split, "axis", 0), axis, rank)
            if not same:
                reason = reason or (
                    "the Split and Concat axes differ in sign and the rank is unknown"
                    if same is None
                    else "the Split and the Concat use different axes"
                )
                i += 1
                continue
            source = split.inputs[0]
            if len(outputs) == len(inputs):
                problem = ctx.forward_problem(m.node.outputs[0], source)  # type: ignore[arg-type]
                if problem:
                    return problem
            m.data = (i, len(outputs), split)
            return None
        return reason or "no Split output run in the Concat"

    def rewrite(self, m: _Match, ctx: RewriteContext) -> ir.Node | None:
        start, count, split = m.data  # type: ignore[misc]
        inputs = list(m.node.inputs)
        source = split.inputs[0]
        if count == len(inputs):
            ctx.forward(m.node.outputs[0], source)
            ctx.kill(m.node)
            ctx.kill_if_unused(split)
            return None
        _set_inputs(m.node, inputs[:start] + [source] + inputs[start + count :])
        ctx.kill_if_unused(split)
        return m.node


def _one_axis_slice(node: ir.Node, ctx: RewriteContext, size_of) -> tuple[int, int, int] | str:
    """(axis, start, end) of a step-1 Slice on one axis, clamped to the axis size."""
    params = _slice_params(node, ctx)
    if isinstance(params, str):
        return params
    starts, ends, axes, steps = params
    if len(starts) != 1 or len(ends) != 1:
        return "the Slice cuts more than one axis"
    if steps is not None and steps != [1]:
        return "the Slice step is not 1"
    axis = axes[0] if axes else 0
    size = size_of(axis)
    if size is None:
        return "the size of the sliced axis is unknown"
    axis = axis % size[1]
    return axis, _clamp(starts[0], size[0]), _clamp(ends[0], size[0])


class SliceSplit(Rule):
    name = "slice-split"
    anchors = ("Slice",)
    needs_shapes = True

    def match(self, node: ir.Node, ctx: RewriteContext) -> _Match | None:
        data = input_at(node, 0)
        if data is None:
            return None
        siblings = [user for user, index in data.uses()
                    if index == 0 and user is not node and user.op_type == "Slice" and user.domain in ("", "ai.onnx")]
        return _Match(node, siblings) if siblings else None

    def check(self, m: _Match, ctx: RewriteContext) -> str | None:
        data = m.node.inputs[0]
        shape = data.shape if data is not None else None

        def size_of(axis: int) -> tuple[int, int] | None:
            if shape is None or not -len(shape) <= axis < len(shape) or not isinstance(shape[axis], int):
                return None
            return int(shape[axis]), len(shape)

        mine = _one_axis_slice(m.node, ctx, size_of)
        if isinstance(mine, str):
            return mine
        pieces = {m.node: mine}
        for sibling in m.data:  # type: ignore[union-attr]
            cut = _one_axis_slice(sibling, ctx, size_of)
            if not isinstance(cut, str) and cut[0] == mine[0]:
                pieces[sibling] = cut
        if len(pieces) < 2:
            return "no other Slice cuts the same axis of the same value"
        if any(node.outputs[0].is_graph_output() for node in pieces):
            return "a Slice output is a graph output"
        order = sorted(pieces, key=lambda n: (pieces[n][1], pieces[n][2]))
        size = size_of(mine[0])
        assert size is not None
        offset = 0
        for node in order:
            _, start, end = pieces[node]
            if start != offset or end <= start:
                return "the Slices do not cut the axis into pieces without gaps or overlap"
            offset = end
        if offset != size[0]:
            return "the Slices do not cover the whole axis"
        for node in ctx.body:  # the Split goes before the anchor: it must be the first of them
            if node is m.node:
                break
            if node in pieces:
                return "another of the Slices comes first"
        m.data = (mine[0], order, [pieces[n][2] - pieces[n][1] for n in order])
        return None

    def rewrite(self, m: _Match, ctx: RewriteContext) -> None:
        axis, order, sizes = m.data  # type: ignore[misc]
        data = m.node.inputs[0]
        inputs: list[ir.Value | None] = [data]
        attributes = [ir.AttrInt64("axis", axis)]
        if ctx.opset >= 13:
            inputs.append(ctx.constant(np.array(sizes, dtype=np.int64), "split_sizes", before=m.node))
        else:
            attributes.append(ir.AttrInt64s("split", sizes))
        split = ctx.node("Split", inputs, attributes=attributes, before=m.node, name_hint="Split",
                         output_names=[f"{n.outputs[0].name or 'slice'}_split" for n in order])
        for node, out in zip(order, split.outputs):
            ctx.forward(node.outputs[0], out)
        ctx.kill(*order)
        return None


@register
@dataclasses.dataclass(frozen=True)
class SimplifyConcatSlice(RulePass):
    """Remove single-input Concats, flatten Concat trees, bypass Slice-of-Concat and Split→Concat."""

    name: ClassVar[str] = "simplify-concat-slice"
    summary: ClassVar[str] = (
        "drop 1-input Concat, flatten Concat of Concat, Slice of Concat -> input, Split+Concat -> input, "
        "Slices tiling an axis -> Split"
    )

    def rules(self) -> list[Rule]:
        return [ConcatSingle(), ConcatConcat(), SplitConcat(), SliceConcat(), SliceSplit()]
