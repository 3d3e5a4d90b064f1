"""simplify-layout: chains of Transpose / Reshape / Flatten / Squeeze / Unsqueeze.

- Transpose∘Transpose becomes one Transpose with the composed permutation,
  or nothing when the composition is the identity.
- Reshape after Reshape/Flatten/Squeeze/Unsqueeze reads the first op's input
  directly (all of them keep the row-major element order); a ``0`` in the
  target shape (copy a dim) is resolved from the intermediate's known shape.
- Flatten after those ops becomes one Reshape to ``[d0*..*d(axis-1), -1]``
  when the leading dims are known.
- Unsqueeze∘Squeeze and Squeeze∘Unsqueeze over the same axes cancel.

(Transposes of constants are folded by fold-constants.) The first op's
output must have no other user and be no graph output.
"""

from __future__ import annotations

import dataclasses
import math
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

RESHAPE_LIKE = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


@dataclasses.dataclass
class _Pair:
    outer: ir.Node
    inner: ir.Node
    data: object = None


def _pair(node: ir.Node, ctx: RewriteContext, *op_types: str) -> _Pair | None:
    inner = ctx.producer(input_at(node, 0), *op_types)
    return None if inner is None or len(node.outputs) != 1 else _Pair(node, inner)


# ---------------------------------------------------------------- Transpose


def _perm(node: ir.Node, rank: int | None) -> list[int] | None:
    perm = attr_ints(node, "perm")
    if perm is not None:
        return perm
    return None if rank is None else list(reversed(range(rank)))


class TransposeTranspose(Rule):
    name = "transpose-transpose"
    anchors = ("Transpose",)

    def match(self, node: ir.Node, ctx: RewriteContext) -> _Pair | None:
        return _pair(node, ctx, "Transpose")

    def check(self, m: _Pair, ctx: RewriteContext) -> str | None:
        reason = ctx.sole_user(m.inner.outputs[0], m.outer, "first Transpose output")
        if reason:
            return reason
        given = attr_ints(m.inner, "perm") or attr_ints(m.outer, "perm")
        rank = len(given) if given is not None else rank_of(m.inner.inputs[0])
        if given is None and rank is None:
            rank = 0  # two reversals cancel whatever the rank
        first, second = _perm(m.inner, rank), _perm(m.outer, rank)
        if first is None or second is None:
            return "the Transpose rank is unknown"
        if len(first) != len(second) or sorted(first) != list(range(len(first))):
            return "the Transpose perms do not compose"
        composed = [first[k] for k in second]
        if composed == list(range(len(composed))):
            reason = ctx.forward_problem(m.outer.outputs[0], m.inner.inputs[0])
            if reason:
                return reason
        m.data = composed
        return None

    def rewrite(self, m: _Pair, ctx: RewriteContext) -> ir.Node | None:
        composed: list[int] = m.data  # type: ignore[assignment]
        source = m.inner.inputs[0]
        assert source is not None
        if composed == list(range(len(composed))):
            ctx.forward(m.outer.outputs[0], source)
            ctx.kill(m.outer, m.inner)
            return None
        m.outer.attributes["perm"] = ir.AttrInt64s("perm", composed)
        ctx.set_input(m.outer, 0, source)
        ctx.kill(m.inner)
        return m.outer


# ---------------------------------------------------------------- Reshape / Flatten


def _reshape_target(node: ir.Node, ctx: RewriteContext) -> list[int] | None:
    if ctx.opset < 5:
        return attr_ints(node, "shape")
    return ctx.ints(input_at(node, 1))


class ReshapeChain(Rule):
    needs_shapes = True
    name = "reshape-chain"
    anchors = ("Reshape",)

    def match(self, node: ir.Node, ctx: RewriteContext) -> _Pair | None:
        return _pair(node, ctx, *RESHAPE_LIKE)

    def check(self, m: _Pair, ctx: RewriteContext) -> str | None:
        reason = ctx.sole_user(m.inner.outputs[0], m.outer, f"{m.inner.op_type} output")
        if reason:
            return reason
        target = _reshape_target(m.outer, ctx)
        if target is None:
            return "the Reshape target shape is not constant"
        if 0 in target and not attr_int(m.outer, "allowzero", 0):
            dims = m.inner.outputs[0].shape
            resolved = []
            for i, d in enumerate(target):
                if d == 0:
                    dim = dims[i] if dims is not None and i < len(dims) else None
                    if not isinstance(dim, int):
                        return "the target shape copies a dim (0) of the intermediate value, whose size is unknown"
                    d = dim
                resolved.append(d)
            m.data = resolved
        return None

    def rewrite(self, m: _Pair, ctx: RewriteContext) -> ir.Node:
        if m.data is not None:
            shape = np.array(m.data, dtype=np.int64)
            if ctx.opset < 5:
                m.outer.attributes["shape"] = ir.AttrInt64s("shape", list(m.data))  # type: ignore[arg-type]
            else:
                ctx.replace_constant(m.outer, 1, shape, hint=f"{m.outer.name or 'reshape'}_shape")
        ctx.set_input(m.outer, 0, m.inner.inputs[0])
        ctx.kill(m.inner)
        return m.outer


class FlattenChain(Rule):
    needs_shapes = True
    name = "flatten-chain"
    anchors = ("Flatten",)

    def match(self, node: ir.Node, ctx: RewriteContext) -> _Pair | None:
        return _pair(node, ctx, *RESHAPE_LIKE)

    def check(self, m: _Pair, ctx: RewriteContext) -> str | None:
        reason = ctx.sole_user(m.inner.outputs[0], m.outer, f"{m.inner.op_type} output")
        if reason:
            return reason
        if ctx.opset < 5:
            return "Reshape takes its shape as an input from opset 5"
        axis = attr_int(m.outer, "axis", 1)
        shape = m.inner.outputs[0].shape
        if axis < 0:
            if shape is None:
                return "the rank of the Flatten input is unknown"
            axis += len(shape)
        if axis == 0:
            m.data = [1, -1]
            return None
        if shape is None or len(shape) < axis:
            return "the shape of the Flatten input is unknown"
        leading = list(shape)[:axis]
        if not all(isinstance(d, int) for d in leading):
            return "the leading dims of the Flatten input are not known"
        m.data = [math.prod(leading), -1]
        return None

    def rewrite(self, m: _Pair, ctx: RewriteContext) -> None:
        shape = ctx.constant(np.array(m.data, dtype=np.int64), f"{m.outer.name or 'flatten'}_shape", before=m.outer)
        reshape = ctx.node("Reshape", [m.inner.inputs[0], shape], before=m.outer, name_hint=m.outer.name or "Reshape")
        ctx.forward(m.outer.outputs[0], reshape.outputs[0])
        ctx.kill(m.outer, m.inner)
        return None


# ---------------------------------------------------------------- Squeeze / Unsqueeze


def _axes(node: ir.Node, ctx: RewriteContext) -> list[int] | None | str:
    """The node's axes; None when absent (Squeeze: all 1-dims); a reason when unreadable."""
    if ctx.opset < 13:
        return attr_ints(node, "axes")
    value = input_at(node, 1)
    if value is None:
        return None
    axes = ctx.ints(value)
    return f"{node.op_type} axes are not constant" if axes is None else axes


def _normalized(axes: list[int], rank: int | None) -> set[int] | None:
    if any(a < 0 for a in axes):
        if rank is None:
            return None
        return {a + rank if a < 0 else a for a in axes}
    return set(axes)


class SqueezeUnsqueeze(Rule):
    """Unsqueeze(Squeeze(x, a), a) and Squeeze(Unsqueeze(x, a), a) are x."""

    name = "squeeze-unsqueeze"
    needs_shapes = True
    anchors = ("Squeeze", "Unsqueeze")

    def match(self, node: ir.Node, ctx: RewriteContext) -> _Pair | None:
        opposite = "Unsqueeze" if node.op_type == "Squeeze" else "Squeeze"
        return _pair(node, ctx, opposite)

    def check(self, m: _Pair, ctx: RewriteContext) -> str | None:
        reason = ctx.sole_user(m.inner.outputs[0], m.outer, f"{m.inner.op_type} output")
        if reason:
            return reason
        source = m.inner.inputs[0]
        assert source is not None
        inner_axes, outer_axes = _axes(m.inner, ctx), _axes(m.outer, ctx)
        for axes in (inner_axes, outer_axes):
            if isinstance(axes, str):
                return axes
        squeeze, unsqueeze = (m.inner, m.outer) if m.inner.op_type == "Squeeze" else (m.outer, m.inner)
        squeeze_axes = inner_axes if squeeze is m.inner else outer_axes
        unsqueeze_axes = outer_axes if squeeze is m.inner else inner_axes
        if unsqueeze_axes is None:
            return "Unsqueeze has no axes"
        # Both axis lists index a value of the same rank: the Squeeze's input
        # (Squeeze first) or the Unsqueeze's output (Unsqueeze first).
        x_rank = rank_of(source)
        if squeeze is m.inner:
            rank = x_rank
        else:
            rank = None if x_rank is None else x_rank + len(unsqueeze_axes)  # type: ignore[arg-type]
        if squeeze_axes is None:
            wide = m.inner.outputs[0] if squeeze is m.outer else source
            dims = wide.shape
            if dims is None or not all(isinstance(d, int) for d in dims):
                return "Squeeze has no axes and the squeezed shape is unknown"
            squeeze_axes = [i for i, d in enumerate(dims) if d == 1]
        first = _normalized(squeeze_axes, rank)  # type: ignore[arg-type]
        second = _normalized(unsqueeze_axes, rank)  # type: ignore[arg-type]
        if first is None or second is None:
            return "negative axes with an unknown rank"
        if first != second or len(first) != len(squeeze_axes) or len(second) != len(unsqueeze_axes):
            return "the Squeeze and Unsqueeze axes differ"
        return ctx.forward_problem(m.outer.outputs[0], source)

    def rewrite(self, m: _Pair, ctx: RewriteContext) -> None:
        source = m.inner.inputs[0]
        assert source is not None
        ctx.forward(m.outer.outputs[0], source)
        ctx.kill(m.outer, m.inner)
        return None


class UnsqueezeChain(Rule):
    """Unsqueeze(Unsqueeze(x, a), b) is one Unsqueeze with the axes merged."""

    name = "unsqueeze-chain"
    needs_shapes = True
    anchors = ("Unsqueeze",)

    def match(self, node: ir.Node, ctx: RewriteContext) -> _Pair | None:
        return _pair(node, ctx, "Unsqueeze")

    def check(self, m: _Pair, ctx: RewriteContext) -> str | None:
        reason = ctx.sole_user(m.inner.outputs[0], m.outer, "Unsqueeze output")
        if reason:
            return reason
        inner_axes, outer_axes = _axes(m.inner, ctx), _axes(m.outer, ctx)
        for axes in (inner_axes, outer_axes):
            if isinstance(axes, str):
                return axes
            if axes is None:
                return "Unsqueeze has no axes"
        rank = rank_of(m.inner.inputs[0])
        middle = None if rank is None else rank + len(inner_axes)  # type: ignore[arg-type]
        final = None if middle is None else middle + len(outer_axes)  # type: ignore[arg-type]
        a, b = _normalized(inner_axes, middle), _normalized(outer_axes, final)  # type: ignore[arg-type]
        if a is None or b is None:
            return "negative axes with an unknown rank"
        # Dim i of the middle value lands on the i-th final position that the
        # outer Unsqueeze does not insert.
        free = [p for p in range(max(a | {0}) + len(b) + 1) if p not in b]
        m.data = sorted(b | {free[i] for i in a})
        return None

    def rewrite(self, m: _Pair, ctx: RewriteContext) -> ir.Node:
        if ctx.opset < 13:
            m.outer.attributes["axes"] = ir.AttrInt64s("axes", list(m.data))  # type: ignore[arg-type]
        else:
            ctx.replace_constant(m.outer, 1, np.array(m.data, dtype=np.int64), hint=f"{m.outer.name or 'unsqueeze'}_axes")
        ctx.set_input(m.outer, 0, m.inner.inputs[0])
        ctx.kill(m.inner)
        return m.outer


@register
@dataclasses.dataclass(frozen=True)
class SimplifyLayout(RulePass):
    """Compose or cancel Transpose, Reshape, Flatten, Squeeze and Unsqueeze chains."""

    name: ClassVar[str] = "simplify-layout"
    summary: ClassVar[str] = (
        "compose/cancel Transpose pairs, merge Reshape/Flatten and Unsqueeze chains, cancel Squeeze/Unsqueeze pairs"
    )

    def rules(self) -> list[Rule]:
        return [TransposeTranspose(), ReshapeChain(), FlattenChain(), SqueezeUnsqueeze(), UnsqueezeChain()]
