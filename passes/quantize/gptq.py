"""GPTQ (``gptq-w4``): int4 blocks chosen with second-order error compensation.

For a linear layer ``y = x W`` the quantization error on calibration inputs is
``||X (W - Q)||^2``, whose Hessian with respect to each output column of ``W``
is ``H = 2 X^T X`` (the same for every output). GPTQ quantizes the input rows
of ``W`` one at a time and spreads each row's rounding error over the rows not
quantized yet, weighted by the inverse Hessian, so later rows absorb what
earlier ones lost. With the upper Cholesky factor ``U`` of ``H^-1``
(``H^-1 = U^T U``), quantizing input index ``j`` is::

    e      = (w_j - dq(q_j)) / U[j, j]
    w_k   -= e * U[j, k]        for every k > j

which equals re-inverting the Hessian with index ``j`` removed after each
step. Updates are applied lazily in runs of columns (one rank-r update per
run instead of r rank-1 updates). Block scales (and zero points) are computed
when quantization reaches a block's first index, from the weights as updated
so far; with ``act_order`` indices go in order of decreasing Hessian diagonal
and every block's scale is fixed up front from the original weights.

Hessians come from ``ctx.calibration`` streamed through onnxruntime (``XᵀX``
accumulated per distinct input; q/k/v projections reading one input share
it). They are gathered a memory-bounded chunk of weights at a time, in graph
order, from the model as quantized so far, so a chunk's inputs already carry
the error of the chunks before it (the paper's layer-by-layer order).
Embedding tables (Gather) and convolutions have no such input and are
rounded to nearest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from compiler.errors import KilnError
from passes.quantize import numerics, weight_only
from passes.quantize.core import LayerRecord, QuantContext, ensure_node_names
from passes.quantize.rewrite import BLOCKED_OPSET, ensure_opset

#: Gram matrices held at once while streaming calibration data (float64 bytes).
STATS_BUDGET_BYTES = 1 << 30
#: Columns per lazy update run (rounded up to a multiple of the block size).
LAZY_COLUMNS = 128


# ------------------------------------------------------------ input statistics


@dataclasses.dataclass
class InputStats:
    """Streaming statistics of one activation ``x`` (rows = tokens, columns = the K input features)."""

    gram: np.ndarray  # sum of x^T x, float64 [K, K]
    abs_sum: np.ndarray  # sum of |x| per feature, float64 [K]
    count: int = 0

    @classmethod
    def empty(cls, k: int) -> InputStats:
        return cls(np.zeros((k, k), np.float64), np.zeros(k, np.float64))

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32).reshape(-1, self.gram.shape[0])
        self.gram += (x.T @ x).astype(np.float64)
        self.abs_sum += np.abs(x).sum(axis=0, dtype=np.float64)
        self.count += x.shape[0]

    @property
    def hessian(self) -> np.ndarray:
        """``2 XᵀX / n``: the Hessian of the mean squared output error."""
        return 2.0 * self.gram / max(self.count, 1)

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(self.count, 1)


def collect_input_stats(
    model: ir.Model, features: Mapping[str, int], batches: Iterable[Mapping[str, np.ndarray]]
) -> dict[str, InputStats]:
    """XᵀX and Σ|x| of each named value (``features`` maps its name to K) over the calibration batches."""
    from passes.quantize.capture import capture

    stats = {name: InputStats.empty(k) for name, k in features.items()}
    for values in capture(model, list(features), batches):
        for name, st in stats.items():
            x = values[name]
            if x.shape[-1] != features[name]:
                raise KilnError(f"calibration: value {name!r} has {x.shape[-1]} features, "
                                f"its weight expects {features[name]}")
            st.add(x)
    return stats


def chunks_by_budget(features: Sequence[tuple[str, int]], budget: int | None = None) -> list[list[tuple[str, int]]]:
    """Split (name, K) pairs, in order, into runs whose K x K float64 Gram matrices fit ``budget``
    (``STATS_BUDGET_BYTES`` by default); an input too big for the budget gets a run of its own."""
    budget = STATS_BUDGET_BYTES if budget is None else budget
    out: list[list[tuple[str, int]]] = []
    used = budget + 1
    for name, k in features:
        size = k * k * 8
        if used + size > budget and (not out or out[-1]):
            out.append([])
            used = 0
        out[-1].append((name, k))
        used += size
    return [c for c in out if c]


def linear_input(node: ir.Node, weight: ir.Value) -> ir.Value | None:
    """The activation a MatMul/Gemm multiplies ``weight`` with, rows = tokens (None when it is not that simple)."""
    if node.op_type == "MatMul" and node.inputs[1] is weight:
        return node.inputs[0]
    if node.op_type == "Gemm" and node.inputs[1] is weight and not node.attributes.get_int("transA", 0):
        return node.inputs[0]
    return None


def weight_inputs(use: weight_only.WeightUse) -> list[ir.Value] | None:
    """Every activation multiplied by this weight, or None when some consumer is not a plain linear layer."""
    if use.kind != "matmul":
        return None
    found: list[ir.Value] = []
    for u in use.value.uses():
        x = linear_input(u.node, use.value)
        if x is None or x.name is None:
            return None
        if x not in found:
            found.append(x)
    return found or None


def as_rows(w: np.ndarray, reduce_axis: int) -> np.ndarray:
    """The weight as [N outputs, K inputs] (the layout GPTQ and AWQ work in)."""
    return w.T if reduce_axis == 0 else w


# ------------------------------------------------------------ the algorithm


def gptq_quantize(
    w: np.ndarray, hessian: np.ndarray, *, bits: int, block_size: int, symmetric: bool,
    damp: float = 0.01, act_order: bool = False, lazy: int = LAZY_COLUMNS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """GPTQ on ``w`` [N, K] (inputs along axis 1) with ``hessian`` [K, K].

    Returns (codes [N, K], scale [N, ceil(K/B)], zero or None) in numerics' blocked
    layout along axis 1, so ``numerics.dequantize(codes, scale, zero, axis=1, block_size=B)``
    is the quantized weight.
    """
    w = np.array(w, dtype=np.float64)
    n, k = w.shape
    nblocks = -(-k // block_size)
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0  # inputs never active: no error to propagate through them

    scale = np.zeros((n, nblocks), np.float32)
    zero = None if symmetric else np.zeros((n, nblocks), np.int32)
    if act_order:
        order = np.argsort(-np.diag(h), kind="stable")
        for b in range(nblocks):  # static blocks: scales from the original weights
            _set_block(w, b, block_size, bits, symmetric, scale, zero)
        w = w[:, order]
        h = h[np.ix_(order, order)]
    else:
        order = np.arange(k)
    u = _inverse_cholesky(h, damp)
    codes = np.zeros((n, k), np.int32)
    lazy = max(block_size, -(-lazy // block_size) * block_size)
    for start in range(0, k, lazy):
        stop = min(start + lazy, k)
        w1 = w[:, start:stop].copy()
        err = np.zeros_like(w1)
        u1 = u[start:stop, start:stop]
        for i in range(stop - start):
            j = start + i
            col = order[j]
            block = col // block_size
            if not act_order and col % block_size == 0:  # runs are whole blocks: this block lies in w1
                view = w1[:, i : i + block_size]
                s, z = numerics.compute_params(view, bits=bits, axis=1, block_size=block_size, symmetric=symmetric)
                scale[:, block] = s[:, 0]
                if zero is not None:
                    zero[:, block] = z[:, 0]
            s_col = scale[:, block]
            z_col = None if zero is None else zero[:, block]
            q = numerics.quantize(w1[:, i], s_col, z_col, bits=bits, axis=0, block_size=0, symmetric=symmetric)
            codes[:, col] = q
            deq = numerics.dequantize(q, s_col, z_col, axis=0, block_size=0)
            e = (w1[:, i] - deq) / u1[i, i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            err[:, i] = e
        w[:, stop:] -= err @ u[start:stop, stop:]
    q_dtype = np.int8 if symmetric else np.uint8
    return codes.astype(q_dtype), scale, zero


def _set_block(w: np.ndarray, b: int, block_size: int, bits: int, symmetric: bool, scale: np.ndarray,
               zero: np.ndarray | None) -> None:
    view = w[:, b * block_size : (b + 1) * block_size]
    s, z = numerics.compute_params(view, bits=bits, axis=1, block_size=block_size, symmetric=symmetric)
    scale[:, b] = s[:, 0]
    if zero is not None:
        zero[:, b] = z[:, 0]


def _inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor of ``(H + λI)^-1``, λ = damp x mean diagonal (raised until H is positive definite)."""
    mean_diag = float(np.mean(np.diag(h))) or 1.0
    eye = np.eye(h.shape[0])
    for factor in (1, 10, 100, 1000):
        try:
            hd = h + damp * factor * mean_diag * eye
            lower = np.linalg.cholesky(hd)
            inv_lower = np.linalg.solve(lower, eye)  # H^-1 = L^-T L^-1
            h_inv = inv_lower.T @ inv_lower
            return np.linalg.cholesky((h_inv + h_inv.T) / 2).T
        except np.linalg.LinAlgError:
            continue
    raise KilnError("gptq-w4: the calibration Hessian is not positive definite even with 1000x damping")


# ------------------------------------------------------------ the scheme


class _HessianSolver:
    """The ``weight_only`` solver for GPTQ: Hessians gathered a chunk at a time, in graph order."""

    def __init__(self, model: ir.Model, ctx: QuantContext, uses: Sequence[weight_only.WeightUse]) -> None:
        self.model = model
        self.ctx = ctx
        self.pending: dict[str, int] = {}  # input name -> K, for inputs not gathered yet, in graph order
        self.readers: dict[str, int] = {}  # input name -> weights still to quantize that read it
        for use in uses:
            if use.consumer.name in ctx.exclude:
                continue
            for x in weight_inputs(use) or ():
                self.pending.setdefault(x.name, _features(use))
                self.readers[x.name] = self.readers.get(x.name, 0) + 1
        self.stats: dict[str, InputStats] = {}

    def __call__(self, use: weight_only.WeightUse, scheme: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        inputs = [x.name for x in weight_inputs(use) or ()]
        if not inputs:
            return weight_only.round_to_nearest(use, scheme)
        missing = [name for name in inputs if name not in self.stats]
        if missing:
            self._gather(missing)
        count = sum(self.stats[name].count for name in inputs)
        hessian = 2.0 * sum(self.stats[name].gram for name in inputs) / max(count, 1)
        for name in inputs:
            self.readers[name] -= 1
            if self.readers[name] <= 0:
                del self.stats[name]
        if count == 0:
            return weight_only.round_to_nearest(use, scheme)
        codes, scale, zero = gptq_quantize(
            as_rows(use.array.astype(np.float32), use.reduce_axis), hessian, bits=scheme.bits,
            block_size=scheme.block_size, symmetric=scheme.symmetric, damp=scheme.damp, act_order=scheme.act_order,
        )
        if use.reduce_axis == 0:
            codes, scale = codes.T, scale.T
            zero = None if zero is None else zero.T
        zero = None if zero is None else np.ascontiguousarray(zero)
        return np.ascontiguousarray(codes), np.ascontiguousarray(scale), zero

    def _gather(self, missing: list[str]) -> None:
        """Statistics of ``missing`` and of as many following inputs as fit the memory budget, in one pass."""
        wanted = [(name, self.pending[name]) for name in missing]
        wanted += [(name, k) for name, k in self.pending.items() if name not in missing]
        chunk = chunks_by_budget(wanted)[0]
        if len(chunk) < len(missing):
            chunk = wanted[: len(missing)]
        for name, _ in chunk:
            del self.pending[name]
        self.stats.update(collect_input_stats(self.model, dict(chunk), self.ctx.calibration))


def _features(use: weight_only.WeightUse) -> int:
    return int(use.value.const_value.shape[use.reduce_axis])


def apply(scheme: Any, model: ir.Model, ctx: QuantContext) -> list[LayerRecord]:
    if ctx.calibration is None or len(ctx.calibration) == 0:
        raise KilnError(f"--quantize {scheme.spec()} needs calibration data", hint="pass --calibration DATA.npz")
    ensure_opset(model, BLOCKED_OPSET)  # may replace the graph: before any value is looked up
    ensure_node_names(model.graph)
    uses = weight_only.find_weights(model, embeddings=scheme.embeddings)
    solver = _HessianSolver(model, ctx, uses)
    return weight_only.apply(scheme, model, ctx, solver=solver, label="gptq")
