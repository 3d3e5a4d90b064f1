"""Normalization fusions: decomposed LayerNorm / RMSNorm, and the residual Add before a norm.

``fuse-layer-norm``: ReduceMean, Sub, Pow 2 (or Mul d d), ReduceMean, Add eps,
Sqrt, Div (or Mul by Reciprocal) [, Mul gamma] [, Add beta] -- what torch's
legacy exporter writes below opset 17, and what hand-written LayerNorms export
to -- becomes ``LayerNormalization`` (ONNX, opset >= 17). Below opset 17 the op
exists only in onnxruntime (its contrib schema sits in the ONNX domain), so
there it needs ``contrib=true``.

``fuse-rms-norm``: [Cast to float,] Pow 2 (or Mul x x), ReduceMean, Add eps,
Sqrt, Reciprocal (or Div 1 by it, or Div x by it), Mul [, Cast back] [, Mul
weight] -- LLaMA / Qwen2 / T5 RMSNorm as exported -- becomes
``RMSNormalization`` (ONNX opset 23) or, with ``contrib=true``, onnxruntime's
``SimplifiedLayerNormalization``.

``fuse-skip-norm`` (``contrib=true`` and ``gpu=true`` only): Add(a, b) feeding
LayerNormalization / SimplifiedLayerNormalization / RMSNormalization over the
last axis becomes ``com.microsoft::SkipLayerNormalization`` /
``SkipSimplifiedLayerNormalization``. When the sum has other users (the
residual stream of a pre-norm transformer) they read the op's fourth output,
and the op takes the Add's place. On onnxruntime's CPU the fused ops measured
several times slower than Add + the norm (``SKIP_NOT_FASTER``), so the rule
only fires for GPU targets (unmeasured here: no GPU build of onnxruntime).

Both norm rules are anchored at the node that divides by the root mean square
(a LayerNorm is an RMSNorm of ``x - mean(x)``) and absorb the scale Mul and
bias Add after it when the value between has no other user. The normalized
axes must be the trailing ones, the scale and bias shapes exactly the
normalized shape, epsilon a constant; without a scale Mul the normalized shape
must be static (a unit scale is made).

Measured with onnxruntime 1.32 on this machine (CPU, one thread, float32
(1, 128, 384), ORT_DISABLE_ALL): decomposed LayerNorm 148 us ->
LayerNormalization 51 us; decomposed RMSNorm 108 us ->
SimplifiedLayerNormalization 29 us / RMSNormalization 28 us. At
ORT_ENABLE_ALL onnxruntime fuses both itself (46-48 us, 28 us), so there the
gain is the node count and runtimes that load with fewer graph optimizations.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from compiler.passes import register
from passes.fusion._rules import RewriteContext, Rule, RulePass
from passes.fusion.transformer_common import (
    FLOAT_TYPES,
    MS_DOMAIN,
    attr_float,
    attr_int,
    attrs,
    binary,
    inside_only,
    interior_problem,
    is_scalar,
    known_dims,
    known_dtype,
    opset_of,
    producer,
    reduce_axes,
    replace,
    same_dims,
    scoped,
    scalar,
    sole_user,
    split,
    trailing_axes,
)


@dataclasses.dataclass
class NormMatch:
    """A decomposed LayerNorm / RMSNorm found at its dividing node."""

    kind: str  # "layer" or "rms"
    x: ir.Value
    anchor: ir.Node  # the node dividing by the root mean square
    reductions: list[ir.Node]
    eps: ir.Value
    nodes: list[ir.Node]  # every node replaced, in graph order
    cast_in: ir.Node | None = None
    cast_out: ir.Node | None = None
    scale: ir.Value | None = None
    bias: ir.Value | None = None
    last: ir.Node | None = None  # the last node replaced
    k: int = 0
    epsilon: float = 0.0
    target: tuple[str, str] = ("", "")

    @property
    def out(self) -> ir.Value:
        return (self.last or self.anchor).outputs[0]


def match_norm_core(node: ir.Node) -> NormMatch | None:
    """The RMS core ending at ``node`` (Div(n, Sqrt(..)) or Mul(n, Reciprocal(Sqrt(..))))."""
    operands = binary(node)
    if operands is None:
        return None
    nodes: list[ir.Node] = []
    if node.op_type == "Div":
        num, den = operands
        sqrt = producer(den, "Sqrt")
    elif node.op_type == "Mul":
        sqrt = num = None
        for i in (0, 1):
            inv = producer(operands[i], "Reciprocal", "Div")
            if inv is None:
                continue
            if inv.op_type == "Reciprocal":
                candidate = producer(inv.inputs[0], "Sqrt")
            elif len(inv.inputs) == 2 and is_scalar(inv.inputs[0], 1.0):
                candidate = producer(inv.inputs[1], "Sqrt")
            else:
                candidate = None
            if candidate is not None:
                sqrt, num = candidate, operands[1 - i]
                nodes.append(inv)
                break
    else:
        return None
    if sqrt is None or num is None:
        return None
    found = split(producer(sqrt.inputs[0], "Add"), "ReduceMean")
    if found is None:
        return None
    mean_sq, eps = found
    add = sqrt.inputs[0].producer()
    square = producer(mean_sq.inputs[0], "Pow", "Mul")
    if square is None or binary(square) is None:
        return None
    base, other = square.inputs
    if square.op_type == "Pow" and not is_scalar(other, 2.0):
        return None
    if square.op_type == "Mul" and base is not other:
        return None
    if base is not num:
        return None
    nodes = [square, mean_sq, add, sqrt, *nodes, node]
    sub = producer(num, "Sub")
    if sub is not None and binary(sub) is not None:
        mean = producer(sub.inputs[1], "ReduceMean")
        if mean is not None and mean.inputs[0] is sub.inputs[0]:
            return NormMatch("layer", sub.inputs[0], node, [mean, mean_sq], eps, [mean, sub, *nodes])
    cast = producer(num, "Cast")
    if cast is not None:
        return NormMatch("rms", cast.inputs[0], node, [mean_sq], eps, [cast, *nodes], cast_in=cast)
    return NormMatch("rms", num, node, [mean_sq], eps, nodes)


def _normalized_dims(x: ir.Value, k: int) -> tuple | None:
    d = known_dims(x)
    if d is None or len(d) < k:
        return None
    return d[len(d) - k :]


def _param_operand(node: ir.Node, current: ir.Value, shape: tuple | None) -> ir.Value | None:
    """The other operand of binary ``node`` (whose one operand is ``current``)
    when it has exactly the normalized ``shape``."""
    operands = binary(node)
    if operands is None or shape is None:
        return None
    a, b = operands
    other = b if a is current else a if b is current else None
    if other is None or other is current or not same_dims(known_dims(other), shape):
        return None
    return other


def extend(m: NormMatch) -> None:
    """Absorb the Cast back, the scale Mul and (LayerNorm) the bias Add after the core."""
    axes, _ = reduce_axes(m.reductions[0])
    k = trailing_axes(axes, m.x)
    shape = _normalized_dims(m.x, k) if k else None
    current = m.anchor.outputs[0]
    user = sole_user(current)
    cast_out = None
    if m.kind == "rms" and user is not None and user.op_type == "Cast" and producer(current) is not None:
        after = sole_user(user.outputs[0])
        if after is not None and after.op_type == "Mul":
            cast_out, current, user = user, user.outputs[0], after
    if user is not None and user.op_type == "Mul":
        scale = _param_operand(user, current, shape)
        if scale is not None:
            if cast_out is not None:
                m.cast_out = cast_out
                m.nodes.append(cast_out)
            m.scale, m.last = scale, user
            m.nodes.append(user)
            current = user.outputs[0]
            user = sole_user(current)
    if m.kind == "layer" and user is not None and user.op_type == "Add":
        bias = _param_operand(user, current, shape)
        if bias is not None:
            m.bias, m.last = bias, user
            m.nodes.append(user)


def check_norm(m: NormMatch, ctx: RewriteContext, contrib: bool) -> str | None:
    if m.cast_in is not None and inside_only(m.cast_in.outputs, m.nodes):
        # The cast input is used elsewhere too (LLaMA's no-op float->float Cast
        # also feeds the residual Add): keep it and normalize its output.
        m.nodes.remove(m.cast_in)
        m.x, m.cast_in = m.cast_in.outputs[0], None
    x = m.x
    t = known_dtype(x)
    if t not in FLOAT_TYPES:
        return f"input dtype {t} is not float, float16 or bfloat16"
    ks = set()
    for reduction in m.reductions:
        axes, keepdims = reduce_axes(reduction)
        if keepdims != 1:
            return "a ReduceMean drops the reduced axes (keepdims=0)"
        k = trailing_axes(axes, x)
        if k is None:
            return f"ReduceMean axes {axes} are not the trailing axes of an input of known rank"
        ks.add(k)
    if len(ks) != 1:
        return "the mean and the variance reduce different axes"
    m.k = ks.pop()
    epsilon = scalar(m.eps)
    if epsilon is None:
        return "epsilon is not a constant scalar"
    m.epsilon = epsilon
    why = interior_problem(m.nodes, m.last or m.anchor)
    if why:
        return why
    out_t = t
    if m.cast_in is not None:
        if _cast_to(m.cast_in) != ir.DataType.FLOAT:
            return f"the input is cast to {_cast_to(m.cast_in)}, not float"
        out_t = ir.DataType.FLOAT
    if m.cast_out is not None:
        out_t = _cast_to(m.cast_out)
    if out_t != t:
        return f"the result dtype {out_t} differs from the input dtype {t}"
    for what, value in (("scale", m.scale), ("bias", m.bias)):
        if value is not None and known_dtype(value) != t:
            return f"{what} dtype {known_dtype(value)} differs from the input dtype {t}"
    if m.scale is None:
        shape = _normalized_dims(x, m.k)
        if shape is None or not all(isinstance(d, int) for d in shape):
            return "no scale Mul and the normalized shape is not static (a unit scale is needed)"
    version = opset_of(ctx)
    if m.kind == "layer":
        if version >= 17 or contrib:
            # Below opset 17 onnxruntime registers LayerNormalization as a contrib op.
            m.target = ("", "LayerNormalization")
            return None
        return (
            f"LayerNormalization needs opset 17 (the model imports opset {version}); "
            "onnxruntime's own LayerNormalization needs contrib=true"
        )
    if version >= 23:
        m.target = ("", "RMSNormalization")
    elif contrib:
        # onnxruntime registers SimplifiedLayerNormalization in the ONNX domain.
        m.target = ("", "SimplifiedLayerNormalization")
    else:
        return (
            f"RMSNormalization needs opset 23 (the model imports opset {version}); "
            "onnxruntime's SimplifiedLayerNormalization needs contrib=true"
        )
    return None


def _cast_to(node: ir.Node) -> ir.DataType | None:
    to = node.attributes.get("to")
    return None if to is None else ir.DataType(to.as_int())



def rewrite_norm(m: NormMatch, ctx: RewriteContext) -> None:
    last = m.last or m.anchor
    domain, op_type = m.target
    scale = m.scale
    if scale is None:
        shape = _normalized_dims(m.x, m.k)
        scale = ctx.constant(np.ones(shape, dtype=known_dtype(m.x).numpy()), f"{op_type}_unit_scale", before=last)
    inputs = [m.x, scale] + ([m.bias] if m.bias is not None else [])
    new = ctx.node(
        op_type,
        inputs,
        attributes=attrs(axis=-m.k, epsilon=m.epsilon, stash_type=1),
        before=last,
        name_hint=scoped(last, op_type),
        domain=domain,
    )
    replace(ctx, m.nodes, [m.out], [new.outputs[0]])


class _NormRule(Rule):
    anchors: ClassVar[tuple[str, ...]] = ("Div", "Mul")
    needs_shapes: ClassVar[bool] = True
    kind: ClassVar[str] = ""

    def __init__(self, contrib: bool) -> None:
        self.contrib = contrib

    def match(self, node: ir.Node, ctx: RewriteContext) -> NormMatch | None:
        m = match_norm_core(node)
        if m is None or m.kind != self.kind:
            return None
        extend(m)
        return m

    def check(self, m: NormMatch, ctx: RewriteContext) -> str | None:
        return check_norm(m, ctx, self.contrib)

    def rewrite(self, m: NormMatch, ctx: RewriteContext) -> None:
        rewrite_norm(m, ctx)


class LayerNormRule(_NormRule):
    name: ClassVar[str] = "layer-norm"
    kind: ClassVar[str] = "layer"


class RmsNormRule(_NormRule):
    name: ClassVar[str] = "rms-norm"
    kind: ClassVar[str] = "rms"


class LayerNormBiasRule(Rule):
    """Add(LayerNormalization(x, scale), bias) -> LayerNormalization(x, scale, bias)."""

    name: ClassVar[str] = "layer-norm-bias"
    anchors: ClassVar[tuple[str, ...]] = ("Add",)
    needs_shapes: ClassVar[bool] = True

    def match(self, node: ir.Node, ctx: RewriteContext):
        found = split(node, "LayerNormalization")
        if found is None:
            return None
        ln, bias = found
        if len(ln.inputs) != 2 or ln.inputs[1] is None:
            return None
        return ln, bias, node

    def check(self, match, ctx: RewriteContext) -> str | None:
        ln, bias, add = match
        axis = attr_int(ln, "axis", -1)
        d = known_dims(ln.inputs[0])
        r = None if d is None else len(d)
        k = -axis if axis < 0 else (r - axis if r is not None else None)
        if k is None:
            return "the LayerNormalization axis is positive and the input rank unknown"
        shape = _normalized_dims(ln.inputs[0], k)
        if not same_dims(known_dims(bias), shape):
            return f"bias shape {known_dims(bias)} is not the normalized shape {shape}"
        if known_dtype(bias) != known_dtype(ln.inputs[0]):
            return f"bias dtype {known_dtype(bias)} differs from the input dtype {known_dtype(ln.inputs[0])}"
        return inside_only(ln.outputs, [add])

    def rewrite(self, match, ctx: RewriteContext) -> None:
        ln, bias, add = match
        new = ctx.node(
            "LayerNormalization",
            [ln.inputs[0], ln.inputs[1], bias],
            attributes=list(ln.attributes.values()),
            before=add,
            name_hint=ln.name or "LayerNormalization",
            domain=ln.domain,
        )
        replace(ctx, [ln, add], [add.outputs[0]], [new.outputs[0]])


@register
@dataclasses.dataclass(frozen=True)
class FuseLayerNorm(RulePass):
    """Fuse decomposed LayerNorm subgraphs into LayerNormalization."""

    name: ClassVar[str] = "fuse-layer-norm"
    summary: ClassVar[str] = (
        "decomposed LayerNorm (ReduceMean/Sub/Pow/Sqrt/Div, Mul gamma, Add beta) -> "
        "LayerNormalization (opset 17; below it onnxruntime's, with contrib)"
    )

    contrib: bool = False

    def rules(self) -> list[Rule]:
        return [LayerNormRule(self.contrib), LayerNormBiasRule()]


@register
@dataclasses.dataclass(frozen=True)
class FuseRmsNorm(RulePass):
    """Fuse decomposed RMSNorm subgraphs into RMSNormalization / SimplifiedLayerNormalization."""

    name: ClassVar[str] = "fuse-rms-norm"
    summary: ClassVar[str] = (
        "decomposed RMSNorm (Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul, weight, LLaMA casts) -> "
        "RMSNormalization (opset 23) or SimplifiedLayerNormalization (contrib)"
    )

    contrib: bool = False

    def rules(self) -> list[Rule]:
        return [RmsNormRule(self.contrib)]


# ---------------------------------------------------------------- residual Add + norm

#: Measured with onnxruntime 1.32 on this machine (CPU, one thread, float32,
#: (1, 128, 384), sum output used): Add + LayerNormalization 68 us,
#: SkipLayerNormalization 343 us; Add + SimplifiedLayerNormalization 36 us,
#: SkipSimplifiedLayerNormalization 78 us (hidden 64 and 768 alike).
SKIP_NOT_FASTER = (
    "onnxruntime's CPU Skip*Normalization measured slower than Add + the norm "
    "(set gpu=true for GPU execution providers)"
)

_SKIP_OPS = {
    "LayerNormalization": "SkipLayerNormalization",
    "SimplifiedLayerNormalization": "SkipSimplifiedLayerNormalization",
    "RMSNormalization": "SkipSimplifiedLayerNormalization",
}


def _maybe_equal(x, y) -> bool:
    return x is None or y is None or x == y


def _skip_order(da: tuple, db: tuple) -> bool | None:
    """Whether to swap (a, b) so the input has the full shape and the skip is the
    same or (1, S, H); None when the Add may broadcast otherwise.

    Dims that shape inference leaves unknown (dynamic exports) are taken as
    equal: a residual Add adds two streams of one shape, and should they differ
    at run time Skip*Normalization stops with a shape error, it computes no
    wrong numbers.
    """
    if len(da) != len(db) or da[-1] is None or da[-1] != db[-1]:
        return None
    if all(_maybe_equal(x, y) for x, y in zip(da, db)):
        if len(da) == 3 and da[0] == 1 and db[0] != 1:
            return True  # a is the broadcast one
        return False
    if len(da) == 3 and all(_maybe_equal(x, y) for x, y in zip(da[1:], db[1:])):
        if db[0] == 1:
            return False
        if da[0] == 1:
            return True
    return None


@dataclasses.dataclass
class _Skip:
    norm: ir.Node
    add: ir.Node
    a: ir.Value
    b: ir.Value
    cast: ir.Node | None = None  # a no-op Cast between the Add and the norm
    residual: bool = False


class SkipNormRule(Rule):
    """Add(a, b) -> {LayerNorm, SimplifiedLayerNorm, RMSNorm} -> com.microsoft Skip*Normalization."""

    name: ClassVar[str] = "skip-norm"
    anchors: ClassVar[tuple[str, ...]] = tuple(_SKIP_OPS)
    needs_shapes: ClassVar[bool] = True

    def __init__(self, contrib: bool, gpu: bool) -> None:
        self.contrib = contrib
        self.gpu = gpu

    def match(self, node: ir.Node, ctx: RewriteContext) -> _Skip | None:
        if not node.inputs or node.inputs[0] is None:
            return None
        cast = producer(node.inputs[0], "Cast")
        add = producer(cast.inputs[0] if cast is not None else node.inputs[0], "Add")
        operands = binary(add)
        if add is None or operands is None:
            return None
        return _Skip(node, add, *operands, cast=cast)

    def check(self, s: _Skip, ctx: RewriteContext) -> str | None:
        if not self.contrib:
            return "Skip*Normalization is an onnxruntime contrib op (needs contrib=true)"
        if not self.gpu:
            return SKIP_NOT_FASTER
        norm = s.norm
        if any(v.uses() or v.is_graph_output() for v in norm.outputs[1:]):
            return "the normalization's mean / inv-std-dev outputs are used"
        if attr_int(norm, "stash_type", 1) != 1:
            return "stash_type is not float"
        da, db = known_dims(s.a), known_dims(s.b)
        if da is None or db is None:
            return "the Add operand shapes are unknown"
        if len(da) not in (2, 3):
            return f"the input rank is {len(da)}; Skip*Normalization takes rank 2 or 3"
        order = _skip_order(da, db)
        if order is None:
            return f"the Add operands may broadcast ({da} and {db})"
        if order:
            s.a, s.b = s.b, s.a
            da, db = db, da
        ta, tb = known_dtype(s.a), known_dtype(s.b)
        if ta not in FLOAT_TYPES or ta != tb:
            return f"the Add operands have dtypes {ta} and {tb}"
        axis = attr_int(norm, "axis", -1)
        if axis not in (-1, len(da) - 1):
            return f"the normalization axis {axis} is not the last axis"
        params = [v for v in norm.inputs[1:] if v is not None]
        for value in params:
            if not same_dims(known_dims(value), (da[-1],)):
                return f"scale/bias shape {known_dims(value)} is not ({da[-1]},)"
        total = s.add.outputs[0]
        if total.is_graph_output():
            return "the sum is a graph output"
        sums = [total]
        if s.cast is not None:
            if _cast_to(s.cast) != ta:
                return f"a Cast to {_cast_to(s.cast)} sits between the Add ({ta}) and the norm"
            if s.cast.outputs[0].is_graph_output():
                return "the sum is a graph output"
            sums.append(s.cast.outputs[0])
        inside = {norm, s.cast}
        s.residual = any(user not in inside for value in sums for user, _ in value.uses())
        if s.residual:
            # The fused op takes the Add's place (the sum's other users may come
            # before the norm), so the scale and bias must exist before it.
            for value in params:
                if value.producer() is not None:
                    return "the sum has other users and the scale/bias is computed in the graph"
        return None

    def rewrite(self, s: _Skip, ctx: RewriteContext) -> None:
        norm = s.norm
        op_type = _SKIP_OPS[norm.op_type]
        inputs = [s.a, s.b, *[v for v in norm.inputs[1:] if v is not None]]
        if norm.op_type != "LayerNormalization":
            inputs = inputs[:3]
        epsilon = attrs(epsilon=attr_float(norm, "epsilon", 1e-5))
        hint = scoped(norm, op_type)
        if not s.residual:
            new = ctx.node(op_type, inputs, attributes=epsilon, before=norm, name_hint=hint, domain=MS_DOMAIN)
            replace(ctx, [s.add, s.cast, norm] if s.cast else [s.add, norm], [norm.outputs[0]], [new.outputs[0]])
        else:
            new = ctx.node(
                op_type,
                inputs,
                attributes=epsilon,
                before=s.add,
                name_hint=hint,
                domain=MS_DOMAIN,
                output_names=[f"{hint}_out", f"{hint}_mean", f"{hint}_inv_std", f"{hint}_sum"],
            )
            olds = [norm.outputs[0], s.add.outputs[0]]
            news = [new.outputs[0], new.outputs[3]]
            if s.cast is not None:
                olds.append(s.cast.outputs[0])
                news.append(new.outputs[3])
            replace(ctx, [s.add, s.cast, norm] if s.cast else [s.add, norm], olds, news)
        ctx.ensure_opset(MS_DOMAIN, 1)


@register
@dataclasses.dataclass(frozen=True)
class FuseSkipNorm(RulePass):
    """Fuse a residual Add into the LayerNorm / RMSNorm after it (onnxruntime contrib ops)."""

    name: ClassVar[str] = "fuse-skip-norm"
    summary: ClassVar[str] = (
        "Add + LayerNormalization / RMSNorm -> com.microsoft SkipLayerNormalization / "
        "SkipSimplifiedLayerNormalization (contrib and gpu: slower on the CPU)"
    )

    contrib: bool = False
    #: The target runs onnxruntime with a GPU execution provider (on the CPU the
    #: fused op measured slower than Add + the norm).
    gpu: bool = False

    def rules(self) -> list[Rule]:
        return [SkipNormRule(self.contrib, self.gpu)]
