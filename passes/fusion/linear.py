"""Gemm / MatMul rules: BatchNormalization, biases and scales folded into the
weights, and MatMul + Add → Gemm.

Pass: ``fuse-matmul-add`` (MatMul with 2-D inputs followed by an Add whose
other operand broadcasts to the product becomes one Gemm). The Gemm/MatMul
rules for BatchNormalization, biases and scales run inside ``fuse-batchnorm``,
``fuse-bias`` and ``fold-scale-into-weights`` (see conv.py).

Gemm computes ``alpha * A' @ B' + beta * C`` (A' = A or Aᵀ per transA, B'
likewise); its output channels are the columns. Gemm before opset 7 (the
``broadcast`` attribute) is left alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from compiler.passes import register
from passes.fusion._affine import (
    FLOAT_DTYPES,
    SCALE_OPS,
    Affine,
    ConsumerAffine,
    PostMatch,
    PreMatch,
    ProducerAffine,
    ProducerBatchNorm,
    cast_to,
    channel_vector,
    f64,
    float_weight,
    input_broadcast_problem,
    pick_producer,
)
from passes.fusion._rules import (
    RewriteContext,
    Rule,
    RulePass,
    attr_float,
    attr_int,
    describe_shape,
    input_at,
    rank_of,
    same_dim,
)

#: Gemm's broadcasting of C (no ``broadcast`` attribute) starts at opset 7.
FIRST_GEMM_OPSET = 7


# ---------------------------------------------------------------- Gemm weights


@dataclasses.dataclass
class GemmParts:
    node: ir.Node
    weight: ir.Value
    bias: ir.Value | None
    w: np.ndarray
    c: np.ndarray | None
    alpha: float
    beta: float
    trans_a: bool
    trans_b: bool

    @property
    def out_features(self) -> int:
        return self.w.shape[0] if self.trans_b else self.w.shape[1]

    @property
    def in_features(self) -> int:
        return self.w.shape[1] if self.trans_b else self.w.shape[0]

    def rows(self) -> int | None:
        """N, the output's row count, when statically known."""
        a = self.node.inputs[0]
        if a is None or a.shape is None or len(a.shape) != 2:
            return None
        dim = a.shape[1 if self.trans_a else 0]
        return dim if isinstance(dim, int) else None

    def scale_out(self, w: np.ndarray, s: np.ndarray) -> np.ndarray:
        return w * (s[:, None] if self.trans_b else s[None, :])

    def scale_in(self, w: np.ndarray, s: np.ndarray) -> np.ndarray:
        return w * (s[None, :] if self.trans_b else s[:, None])

    def effective(self, w: np.ndarray) -> np.ndarray:
        """The weight as a [K, M] matrix."""
        return w.T if self.trans_b else w


def gemm_parts(node: ir.Node, ctx: RewriteContext) -> GemmParts | str:
    if ctx.opset < FIRST_GEMM_OPSET:
        return f"Gemm at opset {ctx.opset} broadcasts by attribute; not rewritten"
    found = float_weight(node, ctx, "Gemm", "Gemm weight B is not constant")
    if isinstance(found, str):
        return found
    weight, tensor = found
    w = tensor.numpy()
    if w.ndim != 2:
        return f"Gemm weight has rank {w.ndim}"
    parts = GemmParts(
        node,
        weight,
        None,
        w,
        None,
        attr_float(node, "alpha", 1.0),
        attr_float(node, "beta", 1.0),
        bool(attr_int(node, "transA", 0)),
        bool(attr_int(node, "transB", 0)),
    )
    bias = input_at(node, 2)
    if bias is not None:
        array = ctx.array(bias)
        if array is None:
            return "Gemm bias C is not constant"
        reason = ctx.exclusive_constant(bias, node, "Gemm bias")
        if reason:
            return reason
        if array.ndim > 2:
            return f"Gemm bias has rank {array.ndim}"
        parts.bias, parts.c = bias, array
    return parts


def _as_2d(array: np.ndarray) -> np.ndarray:
    return array.reshape((1,) * (2 - array.ndim) + array.shape)


def apply_gemm_affine(
    parts: GemmParts,
    scale: np.ndarray | None,
    shift: np.ndarray | None,
    ctx: RewriteContext,
    *,
    weight: np.ndarray | None = None,
) -> None:
    """Make the Gemm compute ``scale * gemm(...) + shift`` (scale per column;
    shift a 2-D array broadcasting to the output), or just replace its weight."""
    node = parts.node
    dtype = ctx.tensor(parts.weight).dtype  # type: ignore[union-attr]
    w = f64(parts.w) if weight is None else weight
    if scale is not None:
        w = parts.scale_out(w, scale)
    if scale is not None or weight is not None:
        ctx.replace_constant(node, 1, cast_to(w, dtype))
    if parts.c is None and shift is None:
        return
    bias = _as_2d(parts.beta * f64(parts.c)) if parts.c is not None else np.zeros((1, 1))
    if scale is not None:
        bias = bias * scale[None, :]
    if shift is not None:
        bias = bias + _as_2d(shift)
    if bias.shape[0] == 1:
        bias = bias.reshape(-1)
    hint = parts.bias.name if parts.bias is not None and parts.bias.name else f"{parts.weight.name or 'gemm'}_bias"
    ctx.replace_constant(node, 2, cast_to(bias, dtype), hint=hint)
    node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)


def _shift_problem(shift: np.ndarray, rows: int | None, columns: int, what: str) -> str | None:
    """A reason when ``shift`` does not broadcast unidirectionally to [rows, columns]."""
    if shift.ndim > 2:
        return f"{what} has rank {shift.ndim}, more than the Gemm output's 2"
    r, c = _as_2d(shift).shape
    if c not in (1, columns):
        return f"{what} has {c} columns, the Gemm output {columns}"
    if r != 1 and r != rows:
        return f"{what} has {r} rows, the Gemm output {rows if rows is not None else 'an unknown number'}"
    return None


# ---------------------------------------------------------------- Gemm rules


class _GemmProducer:
    """Hooks for rules whose Gemm takes the affine after it."""

    producers = ("Gemm",)
    parts_of = staticmethod(gemm_parts)
    apply_affine = staticmethod(apply_gemm_affine)


class GemmOutputAffine(_GemmProducer, ProducerAffine):
    """Gemm → Add/Sub/Mul/Div(constant) becomes the Gemm with new B/C."""

    def set_channels(self, m: PostMatch, parts: GemmParts, affine: Affine, c: np.ndarray) -> str | None:
        what = f"the {m.op.op_type} constant"
        if affine.scale is not None:
            scale = channel_vector(affine.scale, 2, 1, parts.out_features, what)
            if isinstance(scale, str):
                return scale
            m.scale = scale
        if affine.shift is not None:
            reason = _shift_problem(affine.shift, parts.rows(), parts.out_features, what)
            if reason:
                return reason
            m.shift = affine.shift
        return None


class GemmBatchNorm(_GemmProducer, ProducerBatchNorm):
    """Gemm → BatchNormalization (inference, over the columns) becomes the Gemm."""

    name = "gemm-batchnorm"

    def channels(self, parts: GemmParts) -> int:
        return parts.out_features


class GemmInputAffine(ConsumerAffine):
    """Add/Sub/Mul/Div(constant per input feature) → Gemm: a scale goes into the
    rows of B, a shift into C (``alpha * shift @ B``)."""

    anchors = ("Gemm",)
    parts_of = staticmethod(gemm_parts)

    def set_channels(self, m: PreMatch, parts: GemmParts, affine: Affine, c: np.ndarray) -> str | None:
        axis = 0 if parts.trans_a else 1
        return self.set_vectors(m, affine, 2, axis, parts.in_features) or input_broadcast_problem(
            m.op.inputs[m.x_index], c, 2, axis - 2, parts.in_features, m.op.op_type
        )

    def fold_input(self, m: PreMatch, ctx: RewriteContext) -> None:
        parts: GemmParts = m.parts
        w = f64(parts.w)
        shift = None
        if m.shift is not None:
            shift = (parts.alpha * (m.shift @ parts.effective(w)))[None, :]
        if m.scale is not None:
            w = parts.scale_in(w, m.scale)
        apply_gemm_affine(parts, None, shift, ctx, weight=w if m.scale is not None else None)


# ---------------------------------------------------------------- MatMul rules


def _matmul_weight(node: ir.Node, ctx: RewriteContext) -> tuple[ir.Value, np.ndarray, ir.DataType] | str:
    found = float_weight(node, ctx, "MatMul", "MatMul weight (input B) is not constant")
    if isinstance(found, str):
        return found
    weight, tensor = found
    if len(tensor.shape) != 2:
        return f"MatMul weight has rank {len(tensor.shape)}, not 2"
    return weight, tensor.numpy(), tensor.dtype


class MatMulOutputScale(ProducerAffine):
    """MatMul(A, constant 2-D B) → Mul/Div by a per-column constant: B's columns scaled."""

    name = "matmul-mul"
    anchors = SCALE_OPS
    producers = ("MatMul",)

    parts_of = staticmethod(_matmul_weight)

    def set_channels(self, m: PostMatch, parts: Any, affine: Affine, c: np.ndarray) -> str | None:
        assert affine.scale is not None
        a_rank = rank_of(m.producer.inputs[0])
        if c.ndim <= 1:
            rank = 1
        elif a_rank is None:
            return "the rank of the MatMul output is unknown"
        else:
            rank = max(a_rank, 1) if a_rank >= 2 else 1
        _, w, _ = parts
        vector = channel_vector(affine.scale, rank, rank - 1, w.shape[1], f"the {m.op.op_type} constant")
        if isinstance(vector, str):
            return vector
        m.scale = vector
        return None

    def fold(self, m: PostMatch, ctx: RewriteContext) -> None:
        _, w, dtype = m.parts
        ctx.replace_constant(m.producer, 1, cast_to(f64(w) * m.scale[None, :], dtype))


class MatMulInputScale(ConsumerAffine):
    """Mul/Div(per-feature constant) → MatMul(·, constant 2-D B): B's rows scaled."""

    name = "mul-matmul"
    anchors = ("MatMul",)
    ops = SCALE_OPS

    parts_of = staticmethod(_matmul_weight)

    def set_channels(self, m: PreMatch, parts: Any, affine: Affine, c: np.ndarray) -> str | None:
        assert affine.scale is not None
        x = m.op.inputs[m.x_index]
        k = parts[1].shape[0]
        rank = max(c.ndim, 1) if rank_of(x) is None else max(rank_of(x) or 1, 1)
        vector = channel_vector(affine.scale, rank, rank - 1, k, f"the {m.op.op_type} constant")
        if isinstance(vector, str):
            return vector
        reason = input_broadcast_problem(x, c, None, -1, k, m.op.op_type)
        if reason:
            return reason
        m.scale = vector
        return None

    def fold_input(self, m: PreMatch, ctx: RewriteContext) -> None:
        _, w, dtype = m.parts
        ctx.replace_constant(m.node, 1, cast_to(f64(w) * m.scale[:, None], dtype))


def _gemm_dtype_problem(dtype: ir.DataType | None, opset: int) -> str | None:
    if dtype is None:
        return "the MatMul dtype is unknown"
    if dtype not in FLOAT_DTYPES:
        return f"Gemm is not used for dtype {dtype.name}"
    if dtype == ir.DataType.BFLOAT16 and opset < 13:
        return "Gemm takes bfloat16 from opset 13"
    if opset < FIRST_GEMM_OPSET:
        return f"Gemm at opset {opset} broadcasts by attribute; not used"
    return None


def _two_d(value: ir.Value | None, what: str) -> str | None:
    rank = rank_of(value)
    if rank is None:
        return f"the rank of MatMul input {what} is unknown"
    if rank != 2:
        return f"MatMul input {what} has rank {rank}; Gemm takes 2-D inputs"
    return None


class MatMulBatchNorm(ProducerBatchNorm):
    """MatMul(2-D A, constant B) → BatchNormalization becomes Gemm(A, B', C)."""

    name = "matmul-batchnorm"
    needs_shapes = True
    producers = ("MatMul",)

    def parts_of(self, node: ir.Node, ctx: RewriteContext) -> tuple[ir.Value, np.ndarray, ir.DataType] | str:
        reason = _two_d(node.inputs[0], "A")
        if reason:
            return reason
        found = _matmul_weight(node, ctx)
        if isinstance(found, str):
            return found
        return _gemm_dtype_problem(found[2], ctx.opset) or found

    def channels(self, parts: tuple[ir.Value, np.ndarray, ir.DataType]) -> int:
        return parts[1].shape[1]

    def rewrite(self, m: PostMatch, ctx: RewriteContext) -> None:
        weight, w, dtype = m.parts
        new_w = ctx.constant(cast_to(f64(w) * m.scale[None, :], dtype), weight.name or "weight", before=m.op)
        bias = ctx.constant(cast_to(m.shift, dtype), f"{weight.name or 'weight'}_bias", before=m.op)
        gemm = ctx.node("Gemm", [m.producer.inputs[0], new_w, bias], before=m.op, name_hint=m.producer.name or "Gemm")
        ctx.forward(m.op.outputs[0], gemm.outputs[0])
        ctx.kill(m.op, m.producer)
        return None


@dataclasses.dataclass
class _MatMulAdd:
    add: ir.Node
    matmul: ir.Node
    bias: ir.Value


class MatMulAdd(Rule):
    """MatMul(2-D A, 2-D B) → Add(bias broadcasting to [N, M]) becomes Gemm(A, B, bias)."""

    name = "matmul-add"
    anchors = ("Add",)
    needs_shapes = True

    def match(self, node: ir.Node, ctx: RewriteContext) -> _MatMulAdd | None:
        picked = pick_producer(node, ctx, "MatMul")
        if picked is None:
            return None
        return _MatMulAdd(node, picked.producer, node.inputs[1 - picked.x_index])

    def check(self, m: _MatMulAdd, ctx: RewriteContext) -> str | None:
        a, b = m.matmul.inputs[0], m.matmul.inputs[1]
        reason = (
            ctx.sole_user(m.matmul.outputs[0], m.add, "MatMul output")
            or _two_d(a, "A")
            or _two_d(b, "B")
        )
        if reason:
            return reason
        dtype = a.dtype if a is not None and a.dtype is not None else (b.dtype if b is not None else None)
        reason = _gemm_dtype_problem(dtype, ctx.opset)
        if reason:
            return reason
        bias_shape = m.bias.shape
        if bias_shape is None:
            constant = ctx.tensor(m.bias)
            bias_shape = constant.shape if constant is not None else None
        if bias_shape is None:
            return "the shape of the bias is unknown"
        out = [a.shape[0], b.shape[1]]  # type: ignore[union-attr,index]
        if len(bias_shape) > 2 or not all(
            d == 1 or same_dim(d, o) for d, o in zip(reversed(list(bias_shape)), reversed(out))
        ):
            return f"bias shape {describe_shape(list(bias_shape))} does not broadcast to the Gemm output {describe_shape(out)}"
        return None

    def rewrite(self, m: _MatMulAdd, ctx: RewriteContext) -> None:
        gemm = ctx.node(
            "Gemm",
            [m.matmul.inputs[0], m.matmul.inputs[1], m.bias],
            before=m.add,
            name_hint=m.matmul.name or "Gemm",
        )
        ctx.forward(m.add.outputs[0], gemm.outputs[0])
        ctx.kill(m.add, m.matmul)
        return None


@register
@dataclasses.dataclass(frozen=True)
class FuseMatMulAdd(RulePass):
    """MatMul + Add → Gemm where both MatMul inputs are 2-D and the bias broadcasts."""

    name: ClassVar[str] = "fuse-matmul-add"
    summary: ClassVar[str] = "MatMul of 2-D inputs followed by a broadcastable Add becomes Gemm"

    def rules(self) -> list[Rule]:
        return [MatMulAdd()]


__all__ = [
    "Affine",
    "FuseMatMulAdd",
    "GemmBatchNorm",
    "GemmInputAffine",
    "GemmOutputAffine",
    "MatMulAdd",
    "MatMulBatchNorm",
    "MatMulInputScale",
    "MatMulOutputScale",
]
