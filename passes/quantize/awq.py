"""AWQ (``awq-w4``): activation-aware scaling of input channels before int4 rounding.

A few input channels of a linear layer carry much larger activations than the
rest; rounding errors in their weight rows cost the most. AWQ multiplies each
input row ``k`` of the weight by ``s_k`` before rounding and divides the
activation by ``s_k``, which leaves ``x W`` unchanged in float but shrinks the
relative rounding error of the salient rows. ``s = mean|x|^α``, and also
``mean|x|^α / mean|ŵ|^(1-α)`` with ``ŵ`` the weight relative to its block's max
(AutoAWQ's "duo scaling"), normalized so that max·min = 1, with ``α`` searched
on a grid in [0, 1) to minimize the calibration output error

    ||X W − X diag(s)⁻¹ Q(diag(s) W)||²  =  tr(Dᵀ (XᵀX) D),  D = W − diag(s)⁻¹ Q(diag(s) W)

summed over every weight that reads the same ``X`` (q/k/v projections share one
input and so one ``s``). α = 0 is plain round-to-nearest, so the chosen scales
never do worse than ``w4`` on the calibration data.

``1/s`` is folded into whatever produces ``X`` when that is exact: the scale
(and bias) of a LayerNormalization / RMSNormalization / SimplifiedLayerNormalization,
a Mul by a constant, the output columns of a MatMul/Gemm (through a bias Add),
or one factor of a Mul of two activations (the SwiGLU ``act(gate) * up``).
Otherwise a ``Mul(x, 1/s)`` is inserted for the scaled layers. Then the scaled
weights are rounded to nearest (``weight_only``), like ``w4``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from compiler.errors import KilnError
from passes.quantize import numerics, weight_only
from passes.quantize.core import LayerRecord, QuantContext, ensure_node_names
from passes.quantize.gptq import InputStats, as_rows, chunks_by_budget, collect_input_stats, linear_input, weight_inputs
from passes.quantize.rewrite import BLOCKED_OPSET, add_initializer, ensure_opset, unique_name, unique_node_name

#: output rows of each weight the α search measures (wider weights are sampled evenly)
SEARCH_OUTPUTS = 1024
#: an activation that needs an inserted Mul(x, 1/s) is scaled only when that cuts its layers' error by this share
INSERTED_MUL_MIN_GAIN = 0.05
_SHAPE_ONLY = frozenset({"Shape", "Size"})
_NORMS = {  # op -> (scale input index, bias input index or None)
    "LayerNormalization": (1, 2),
    "RMSNormalization": (1, None),
    "SimplifiedLayerNormalization": (1, None),
    "SkipLayerNormalization": (2, 3),
    "SkipSimplifiedLayerNormalization": (2, None),
}


@dataclasses.dataclass
class Group:
    """Weights multiplied with one activation, scaled together."""

    x: ir.Value
    uses: list[weight_only.WeightUse]
    alpha: float = 0.0
    scales: np.ndarray | None = None
    folded_into: str = ""


def apply(scheme: Any, model: ir.Model, ctx: QuantContext) -> list[LayerRecord]:
    groups = rescale(scheme, model, ctx)
    records = weight_only.apply(scheme, model, ctx, label="awq: rounding")
    by_node = {u.consumer.name: g for g in groups for u in g.uses}  # weights may have been renamed by a fold
    for record in records:
        group = by_node.get(record.node)
        if group is not None and record.scheme != "float32":
            record.note = f"awq alpha={group.alpha:.2f}" + (f", 1/s in {group.folded_into}" if group.alpha else "")
    return records


def rescale(scheme: Any, model: ir.Model, ctx: QuantContext) -> list[Group]:
    """The float half of AWQ: search every group's scales and apply them (weights stay float)."""
    if ctx.calibration is None or len(ctx.calibration) == 0:
        raise KilnError(f"--quantize {scheme.spec()} needs calibration data", hint="pass --calibration DATA.npz")
    ensure_opset(model, BLOCKED_OPSET)  # may replace the graph: before any value is looked up
    ensure_node_names(model.graph)
    groups = find_groups(model, scheme, ctx)
    by_name = {g.x.name: g for g in groups}
    with ctx.progress("awq: searching scales", len(groups)) as bar:
        for chunk in chunks_by_budget([(g.x.name, _features(g.uses[0])) for g in groups]):
            stats = collect_input_stats(model, dict(chunk), ctx.calibration)
            for name, _ in chunk:
                group = by_name[name]
                bar.update(1, name)
                foldable = fold_plan(group.x, group) is not None
                search_scales(group, stats.pop(name), scheme, min_gain=0.0 if foldable else INSERTED_MUL_MIN_GAIN)
                if group.alpha > 0:
                    scale_group(model.graph, group)
    return groups


def find_groups(model: ir.Model, scheme: Any, ctx: QuantContext) -> list[Group]:
    """Quantizable MatMul/Gemm weights grouped by the one activation each multiplies, in graph order."""
    groups: dict[str, Group] = {}
    for use in weight_only.find_weights(model, embeddings=False, kinds=("matmul",)):
        if use.consumer.name in ctx.exclude:
            continue
        inputs = weight_inputs(use)
        if not inputs or len(inputs) != 1:
            continue
        x = inputs[0]
        if x.shape is not None and len(x.shape) >= 1 and isinstance(x.shape[-1], int) and x.shape[-1] != _features(use):
            continue
        groups.setdefault(x.name, Group(x, [])).uses.append(use)
    return list(groups.values())


def _features(use: weight_only.WeightUse) -> int:
    return int(use.value.const_value.shape[use.reduce_axis])


# ------------------------------------------------------------ the search


def search_scales(group: Group, stats: InputStats, scheme: Any, min_gain: float = 0.0) -> None:
    """Pick α (and the scales) minimizing the group's output error on the calibration statistics.

    Scaling is kept only when it cuts the error by more than ``min_gain`` (a share of the
    round-to-nearest error): an inserted Mul costs a pass over the activation at run time.
    """
    if stats.count == 0:
        return
    gram = (stats.gram / stats.count).astype(np.float32)
    mean_abs = stats.mean_abs
    top = float(mean_abs.max())
    if top <= 0:
        return
    base = np.maximum(mean_abs, top * 1e-6)
    weights = [_search_rows(as_rows(u.array.astype(np.float32), u.reduce_axis)) for u in group.uses]
    row_size = weight_row_magnitude(weights, scheme.block_size)
    errors = []  # α = 0 first: s = 1, round to nearest
    for i in range(scheme.grid):
        alpha = i / scheme.grid
        candidates = [normalized_scales(base, alpha)]
        if i > 0:
            candidates.append(normalized_scales(base, alpha, row_size))
        for s in candidates:
            errors.append((sum(scaled_error(w, s, gram, scheme) for w in weights), i, s))
    best_err, best_i, best_s = min(errors, key=lambda e: (e[0], e[1]))
    if best_i > 0 and best_err < (1.0 - min_gain) * errors[0][0]:
        group.alpha, group.scales = best_i / scheme.grid, best_s
    else:
        group.alpha, group.scales = 0.0, None


def _search_rows(w_rows: np.ndarray) -> np.ndarray:
    """At most ``SEARCH_OUTPUTS`` evenly spaced output rows: each row's error is exact (its blocks run along K),
    and every α is judged on the same rows, so a wide layer (an LM head) costs no more than a narrow one."""
    if w_rows.shape[0] <= SEARCH_OUTPUTS:
        return w_rows
    return w_rows[np.linspace(0, w_rows.shape[0] - 1, SEARCH_OUTPUTS).round().astype(int)]


def normalized_scales(mean_abs: np.ndarray, alpha: float, row_size: np.ndarray | None = None) -> np.ndarray:
    """``mean|x|^α`` (over ``row_size^(1-α)`` when given) scaled so that max·min = 1."""
    s = np.power(mean_abs, alpha)
    if row_size is not None:
        s = s / np.power(row_size, 1.0 - alpha)
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)


def weight_row_magnitude(weights: Sequence[np.ndarray], block_size: int) -> np.ndarray:
    """Per input channel, the mean of |w| relative to its block's max over every output row.

    Dividing the scales by this too (AutoAWQ's "duo scaling", as in SmoothQuant) also evens out
    rows that are large in the weight rather than in the activation: a norm gain folded into the
    weights by -O2 is such a row. Both families are searched; the error decides.
    """
    rows = np.concatenate(weights, axis=0)
    n, k = rows.shape
    pad = (-k) % block_size
    blocked = np.abs(np.pad(rows, ((0, 0), (0, pad)))).reshape(n, -1, block_size)
    relative = blocked / np.maximum(blocked.max(axis=2, keepdims=True), 1e-12)
    return np.maximum(relative.reshape(n, -1)[:, :k].mean(axis=0), 1e-6)


def scaled_error(w_rows: np.ndarray, s: np.ndarray, gram: np.ndarray, scheme: Any) -> float:
    """``tr(Dᵀ G D)`` for ``D = W − Q(W diag(s)) diag(s)⁻¹``; ``w_rows`` is [N, K], ``gram`` = XᵀX / n."""
    scaled = w_rows * s[None, :]
    q, scale, zero = numerics.quantize_weight(scaled, bits=scheme.bits, axis=1, block_size=scheme.block_size,
                                              symmetric=scheme.symmetric)
    diff = w_rows - numerics.dequantize(q, scale, zero, axis=1, block_size=scheme.block_size) / s[None, :]
    return float(np.sum(diff * (diff @ gram)))


# ------------------------------------------------------------ applying the scales


def scale_group(graph: ir.Graph, group: Group) -> None:
    """Weights *= s along their input rows; 1/s into X's producer, or a Mul in front of the group."""
    s = group.scales
    assert s is not None
    inv = (1.0 / s).astype(np.float32)
    plan = fold_plan(group.x, group)
    if plan is not None:
        for node, index, axis in plan:
            _scale_constant(graph, node, index, inv, axis)
        group.folded_into = ", ".join(dict.fromkeys(f"{n.op_type} {n.name}" for n, _, _ in plan))
        readers = [u.node for u in group.x.uses() if u.node.op_type not in _SHAPE_ONLY]
    else:
        readers = [n for u in group.uses for n in _readers(u.value, group.x)]
        _insert_mul(graph, group.x, inv, readers)
        group.folded_into = "an inserted Mul"
    # every reader of a scaled weight multiplies it with x (weight_inputs / fold_plan checked): scale it in place
    weights = {id(n.inputs[1]): n for n in readers}
    for node in weights.values():
        _scale_weight(node.inputs[1], s, 1 if (node.op_type == "Gemm" and node.attributes.get_int("transB", 0)) else 0)


def _scale_weight(weight: ir.Value, s: np.ndarray, axis: int) -> None:
    array = weight.const_value.numpy()
    shape = [1, 1]
    shape[axis] = s.shape[0]
    scaled = (array.astype(np.float32) * s.reshape(shape)).astype(array.dtype)
    weight.const_value = ir.tensor(scaled, name=weight.name)


def _readers(weight: ir.Value, x: ir.Value) -> list[ir.Node]:
    return [u.node for u in weight.uses() if linear_input(u.node, weight) is x]


def fold_plan(x: ir.Value, group: Group) -> list[tuple[ir.Node, int, int]] | None:
    """Where ``1/s`` can go so that ``x`` becomes ``x/s`` exactly: (node, constant input, axis of K) edits.

    None when some reader of ``x`` is not a linear layer whose weight can take ``s``
    (folding changes ``x`` for every reader), or when the producer is not foldable.
    """
    if x.is_graph_output() or x.is_graph_input() or x.producer() is None:
        return None
    k = _features(group.uses[0])
    for u in x.uses():
        if u.node.op_type in _SHAPE_ONLY and u.node.domain in ("", "ai.onnx"):
            continue  # reads x's shape, not its values
        weight = u.node.inputs[1] if len(u.node.inputs) > 1 else None
        if weight is None or linear_input(u.node, weight) is not x or not _is_const(weight):
            return None
        if any(linear_input(w.node, weight) is not x for w in weight.uses()):
            return None  # the weight is also multiplied with something else
    return _producer_plan(x, k)


def _producer_plan(x: ir.Value, k: int) -> list[tuple[ir.Node, int, int]] | None:
    node = x.producer()
    if node is None or x.is_graph_output():
        return None
    op, domain = node.op_type, node.domain
    if op in _NORMS and domain in ("", "ai.onnx", "com.microsoft") and node.outputs[0] is x:
        if node.attributes.get_int("axis", -1) != -1:
            return None
        scale_i, bias_i = _NORMS[op]
        plan = []
        for i in (scale_i, bias_i):
            if i is not None and i < len(node.inputs) and node.inputs[i] is not None:
                if not _vector_const(node.inputs[i], k):
                    return None
                plan.append((node, i, -1))
        return plan or None
    if domain not in ("", "ai.onnx"):
        return None
    if op == "Mul":
        a, b = node.inputs
        for i, c in ((1, b), (0, a)):
            if _is_const(c):
                return [(node, i, -1)] if _vector_const(c, k) else None
        for other in (b, a):  # a product of two activations: scale one factor at its source
            if len(list(other.uses())) == 1:
                plan = _producer_plan(other, k)
                if plan is not None:
                    return plan
        return None
    if op == "Add":
        a, b = node.inputs
        for i, c, other in ((1, b, a), (0, a, b)):
            if _is_const(c) and _vector_const(c, k) and len(list(other.uses())) == 1:
                rest = _producer_plan(other, k)
                return None if rest is None else [(node, i, -1)] + rest
        return None
    if op == "MatMul" and _is_const(node.inputs[1]) and len(node.inputs[1].const_value.shape) == 2:
        return [(node, 1, -1)] if node.inputs[1].const_value.shape[1] == k else None
    if op == "Gemm" and _is_const(node.inputs[1]):
        plan = [(node, 1, 0 if node.attributes.get_int("transB", 0) else -1)]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            if not _vector_const(node.inputs[2], k):
                return None
            plan.append((node, 2, -1))
        return plan
    return None


def _is_const(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.is_initializer() and not value.is_graph_input()


def _vector_const(value: ir.Value | None, k: int) -> bool:
    """A constant that broadcasts along the last axis only (shape [..., 1 or K] with every other dim 1)."""
    if not _is_const(value):
        return False
    shape = tuple(value.const_value.shape)
    return all(d == 1 for d in shape[:-1]) and (not shape or shape[-1] in (1, k))


def _scale_constant(graph: ir.Graph, node: ir.Node, index: int, factor: np.ndarray, axis: int) -> None:
    """Replace ``node``'s constant input ``index`` by itself times ``factor`` along ``axis`` (a new initializer)."""
    old = node.inputs[index]
    array = old.const_value.numpy()
    dtype = array.dtype
    wide = array.astype(np.float32)
    if axis == -1:
        if wide.ndim == 0 or wide.shape[-1] == 1:
            wide = np.broadcast_to(wide, (*wide.shape[:-1], factor.shape[0]) if wide.ndim else factor.shape)
        new = wide * factor
    else:
        shape = [1] * wide.ndim
        shape[axis] = factor.shape[0]
        new = wide * factor.reshape(shape)
    value = add_initializer(graph, f"{old.name}_awq", np.ascontiguousarray(new.astype(dtype)))
    node.replace_input_with(index, value)
    if not any(True for _ in old.uses()) and not old.is_graph_output() and old.name in graph.initializers:
        graph.initializers.pop(old.name)


def _insert_mul(graph: ir.Graph, x: ir.Value, inv: np.ndarray, readers: Sequence[ir.Node]) -> None:
    order = {id(n): i for i, n in enumerate(graph)}
    first = min(readers, key=lambda n: order[id(n)])
    factor = add_initializer(graph, f"{x.name}_awq_inv_scale", inv)
    mul = ir.Node("", "Mul", [x, factor], name=unique_node_name(graph, f"{x.name}_awq_scale"), num_outputs=1)
    out = mul.outputs[0]
    out.name = unique_name(graph, f"{x.name}_awq_scaled")
    out.type = x.type
    out.shape = x.shape
    graph.insert_before(first, mul)
    for node in readers:
        for i, value in enumerate(node.inputs):
            if value is x:
                node.replace_input_with(i, out)
