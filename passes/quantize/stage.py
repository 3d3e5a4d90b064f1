"""The quantize stage of a compile: apply a scheme, measure it, hold an accuracy budget, report.

The stage works on copies of the float model: every attempt (the full
quantization, the per-layer sensitivity probes of an accuracy budget) starts
from the same float model, so schemes need not be undoable. Accuracy is
measured on evaluation feeds the calibration never saw (every k-th batch of
``--calibration``, see ``CalibrationSet.split``), or on seeded random inputs
when there is no calibration data (the report says which).

Budget search: quantize everything; if the budget fails, measure each layer's
sensitivity (the metric with only that layer quantized), then binary-search the
fewest most-sensitive layers to keep in float that make the budget hold. At
most ``MAX_FALLBACK`` of the quantizable layers may stay float; past that the
budget is reported as unreachable with the best figure reached.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from compiler.errors import KilnError
from passes.quantize import numerics
from passes.quantize.calibration import CalibrationSet
from passes.quantize.capture import capture
from passes.quantize.core import LayerRecord, QuantContext, ensure_node_names
from passes.quantize.schemes import Scheme

#: share of the evaluation batches held back from calibration
HOLDOUT = 0.25
#: the accuracy budget may keep at most this share of the quantizable layers in float
MAX_FALLBACK = 0.5
#: models with more initializer bytes than this are quantized in place, without copies or measurements
IN_MEMORY_LIMIT = 1 << 30
#: random evaluation feeds when there is no calibration data
RANDOM_FEEDS = 4
#: per-layer sensitivity probes at most (more layers are probed in contiguous groups)
MAX_PROBES = 48

METRICS = {
    "cosine": "mean cosine similarity of the outputs vs float",
    "top1-agreement": "share of argmax (last axis) equal to float's",
    "sqnr": "output signal-to-quantization-noise ratio in dB",
}


@dataclasses.dataclass(frozen=True)
class Budget:
    metric: str
    threshold: float

    def holds(self, value: float) -> bool:
        return value >= self.threshold

    def __str__(self) -> str:
        return f"{self.metric}>={self.threshold:g}"


def parse_budget(text: str) -> Budget:
    m = re.fullmatch(r"\s*([a-z0-9-]+)\s*>=\s*([-+0-9.eE]+)\s*", text or "")
    if not m or m.group(1) not in METRICS:
        raise KilnError(f"--accuracy-budget {text!r}: expected METRIC>=VALUE",
                        hint="metrics: " + "; ".join(f"{k} ({v})" for k, v in METRICS.items()))
    try:
        value = float(m.group(2))
    except ValueError:
        raise KilnError(f"--accuracy-budget {text!r}: {m.group(2)!r} is not a number") from None
    return Budget(m.group(1), value)


@dataclasses.dataclass
class QuantReport:
    scheme: str
    layers: list[LayerRecord]
    evaluation: dict[str, Any]
    metrics: dict[str, float]
    bytes_before: int
    bytes_after: int
    budget: dict[str, Any] | None = None
    seconds: float = 0.0
    #: filled by the driver when the artifact can run here (not written to quantization.json: timings vary)
    latency_ms: dict[str, float] | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        quantized = [r for r in self.layers if r.scheme != "float32"]
        return {
            "schema": 1,
            "scheme": self.scheme,
            "model": {
                "weight_bytes_before": self.bytes_before,
                "weight_bytes_after": self.bytes_after,
                "size_ratio": _round(self.bytes_after / self.bytes_before) if self.bytes_before else None,
                "layers_quantized": len(quantized),
                "layers_kept_float": len(self.layers) - len(quantized),
                "metrics": {k: _round(v) for k, v in self.metrics.items()},
            },
            "evaluation": self.evaluation,
            **({"budget": self.budget} if self.budget else {}),
            "layers": [_rounded(r.to_json()) for r in self.layers],
        }

    def summary(self) -> list[str]:
        lines = [
            f"quantized {sum(r.scheme != 'float32' for r in self.layers)}/{len(self.layers)} layers with {self.scheme}: "
            f"weights {self.bytes_before / 1e6:.2f} MB -> {self.bytes_after / 1e6:.2f} MB"
            + (f" ({self.bytes_after / self.bytes_before:.3f}x)" if self.bytes_before else ""),
        ]
        if self.metrics:
            figures = ", ".join(f"{k} {v:.4f}" if k != "sqnr" else f"sqnr {v:.1f} dB" for k, v in self.metrics.items())
            lines.append(f"accuracy vs float on {self.evaluation.get('data', '?')}: {figures}")
        if self.budget:
            lines.append(f"accuracy budget {self.budget['expression']}: met with "
                         f"{len(self.budget['kept_float'])} layer(s) kept in float")
        if self.latency_ms:
            lines.append("onnxruntime latency here: " + ", ".join(f"{k} {v:.2f} ms" for k, v in self.latency_ms.items()))
        return lines


def _round(x: float) -> float:
    if not math.isfinite(x):
        return x
    return float(f"{x:.6g}")


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _round(v) if isinstance(v, float) else v for k, v in d.items()}


# --------------------------------------------------------------------------- the stage


def quantize_model(
    model: ir.Model, scheme: Scheme, spec: Any, *, calibration: CalibrationSet | None = None,
    budget: Budget | None = None, exclude: Sequence[str] = (), quiet: bool = True,
    log: Callable[[str], None] | None = None,
) -> QuantReport:
    """Quantize ``model`` in place with ``scheme``; measure against the float model; hold ``budget``."""
    say = log or (lambda _m: None)
    start = time.perf_counter()
    if scheme.needs_calibration and calibration is None:
        raise KilnError(f"--quantize {scheme.spec()} needs calibration data",
                        hint="pass --calibration PATH (.npz of inputs, a folder of .npz/.npy files, or a folder of images)")
    calib, evaluation = calibration.split(HOLDOUT) if calibration is not None else (None, None)
    ensure_node_names(model.graph)
    apply = _implementation(scheme)
    user_exclude = frozenset(exclude)

    def attempt(target: ir.Model, excluded: frozenset[str]) -> list[LayerRecord]:
        ctx = QuantContext(spec=spec, calibration=calib, exclude=excluded | user_exclude, quiet=quiet, log=say)
        return apply(scheme, target, ctx)

    bytes_before = _weight_bytes(model)
    if bytes_before > IN_MEMORY_LIMIT:
        if budget is not None:
            raise KilnError(f"--accuracy-budget needs the model in memory twice; this one has "
                            f"{bytes_before / 2**30:.1f} GiB of weights (limit {IN_MEMORY_LIMIT / 2**30:.0f} GiB)")
        layers = attempt(model, frozenset())
        return QuantReport(scheme.spec(), layers, {"skipped": "model too large to hold a float copy"}, {},
                           bytes_before, _weight_bytes(model), seconds=time.perf_counter() - start)

    float_proto = ir.to_proto(model)
    float_model = ir.from_proto(float_proto)
    feeds, data_label = _evaluation_feeds(model, evaluation, calibration)
    meter = _Meter(float_model, feeds)

    def fresh() -> ir.Model:
        return ir.from_proto(float_proto)

    candidate = fresh()
    layers = attempt(candidate, frozenset())
    try:
        metrics = meter.model_metrics(candidate)
    except _CannotRun as err:
        if budget is not None:
            raise KilnError(f"--accuracy-budget {budget} cannot be measured: {err}") from None
        _replace_contents(model, candidate)
        return QuantReport(scheme.spec(), layers, {"skipped": str(err)}, {}, bytes_before, _weight_bytes(model),
                           seconds=time.perf_counter() - start)
    budget_info = None
    if budget is not None:
        budget_value = metrics.get(budget.metric)
        say(f"{budget.metric} with every layer quantized: {budget_value:.5f} (budget {budget})")
        if budget_value is not None and budget.holds(budget_value):
            budget_info = {"expression": str(budget), "met": True, "value": _round(budget_value), "kept_float": []}
        else:
            candidate, layers, metrics, budget_info = _hold_budget(
                budget, layers, metrics, fresh, attempt, meter, quiet)
    _replace_contents(model, candidate)
    meter.layer_metrics(model, layers)
    evaluation_info = {"data": data_label, "batches": len(feeds)}
    return QuantReport(scheme.spec(), layers, evaluation_info, metrics, bytes_before, _weight_bytes(model),
                       budget=budget_info, seconds=time.perf_counter() - start)


def _implementation(scheme: Scheme) -> Callable[..., list[LayerRecord]]:
    module, _, function = scheme.implementation.partition(":")
    return getattr(importlib.import_module(module), function)


def _hold_budget(budget, layers, metrics, fresh, attempt, meter, quiet):
    from compiler.progress import Progress

    quantized = [r.node for r in layers if r.scheme != "float32"]
    if not quantized:
        raise KilnError(f"--accuracy-budget {budget}: nothing was quantized, so nothing can be traded for accuracy")
    groups = _probe_groups(quantized)
    sensitivity: list[tuple[float, list[str]]] = []
    all_nodes = frozenset(quantized)
    with Progress("measuring layer sensitivity", len(groups), quiet=quiet) as bar:
        for group in groups:
            probe = fresh()
            attempt(probe, all_nodes - frozenset(group))
            value = meter.model_metrics(probe).get(budget.metric, float("-inf"))
            sensitivity.append((value, group))
            bar.update(1, group[0])
    # the lower the metric with only this group quantized, the more sensitive the group
    ranked = [g for _, g in sorted(sensitivity, key=lambda item: item[0])]
    limit = max(1, int(len(ranked) * MAX_FALLBACK))
    best = (metrics.get(budget.metric, float("-inf")), 0)
    cache: dict[int, tuple[ir.Model, list[LayerRecord], dict[str, float]]] = {}

    def try_keep(n: int):
        if n not in cache:
            keep = frozenset(node for g in ranked[:n] for node in g)
            model = fresh()
            recs = attempt(model, keep)
            cache[n] = (model, recs, meter.model_metrics(model))
        return cache[n]

    lo, hi = 1, limit
    if not budget.holds(try_keep(hi)[2].get(budget.metric, float("-inf"))):
        value = try_keep(hi)[2].get(budget.metric, float("-inf"))
        best = max(best, (value, hi))
        raise KilnError(
            f"--accuracy-budget {budget} cannot be met: the best reached is {budget.metric} {best[0]:.5f} "
            f"with {sum(len(g) for g in ranked[:best[1]])} of {len(quantized)} layers kept in float",
            hint=f"at most {int(MAX_FALLBACK * 100)}% of the layers may stay float; try another scheme "
                 "(e.g. int8 method=entropy, w8) or a lower budget")
    while lo < hi:
        mid = (lo + hi) // 2
        if budget.holds(try_keep(mid)[2].get(budget.metric, float("-inf"))):
            hi = mid
        else:
            lo = mid + 1
    model, recs, final = try_keep(lo)
    kept = [node for g in ranked[:lo] for node in g]
    info = {"expression": str(budget), "met": True, "value": _round(final[budget.metric]), "kept_float": kept,
            "value_all_quantized": _round(metrics.get(budget.metric, float("nan")))}
    return model, recs, final, info


def _probe_groups(nodes: list[str]) -> list[list[str]]:
    if len(nodes) <= MAX_PROBES:
        return [[n] for n in nodes]
    size = -(-len(nodes) // MAX_PROBES)
    return [nodes[i : i + size] for i in range(0, len(nodes), size)]


def _replace_contents(model: ir.Model, other: ir.Model) -> None:
    model.graph = other.graph  # type: ignore[misc]  (opset imports live on the graph)
    model.ir_version = other.ir_version
    model.functions.clear()
    model.functions.update(other.functions)


def _weight_bytes(model: ir.Model) -> int:
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def _evaluation_feeds(model: ir.Model, evaluation: CalibrationSet | None, whole: CalibrationSet | None):
    if evaluation is not None:
        label = f"{len(evaluation)} held-out batch(es) of {whole.source}" if len(whole) > 1 \
            else f"the calibration data ({whole.source}; too few batches to hold any back)"
        return list(evaluation), label
    from compiler.signature import random_inputs, signature

    sig = signature(model)["inputs"]
    try:
        feeds = [random_inputs(sig, seed=i) for i in range(RANDOM_FEEDS)]
    except KilnError:
        return [], "nothing (no calibration data, and random inputs cannot be made for this signature)"
    return feeds, f"{RANDOM_FEEDS} seeded random input(s) (no calibration data)"


class _CannotRun(Exception):
    """onnxruntime on this host cannot run the quantized model (e.g. bfloat16 compute on the CPU provider)."""


class _Meter:
    """Float outputs computed once; metrics of a candidate against them."""

    def __init__(self, float_model: ir.Model, feeds: list[dict[str, np.ndarray]]) -> None:
        self.float_model = float_model
        self.feeds = feeds
        self.outputs = [o.name for o in float_model.graph.outputs]
        self.reference = list(capture(float_model, [], feeds)) if feeds else []

    def model_metrics(self, candidate: ir.Model) -> dict[str, float]:
        if not self.feeds:
            return {}
        try:
            got = list(capture(candidate, [], self.feeds))
        except Exception as err:  # onnxruntime raises its own exception types; any failure means "cannot run here"
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise _CannotRun(f"onnxruntime on this host cannot run the quantized model ({first})") from None
        return output_metrics(self.reference, got, self.outputs)

    def layer_metrics(self, candidate: ir.Model, layers: list[LayerRecord]) -> None:
        if not self.feeds:
            return
        names = [r.output for r in layers if r.scheme != "float32"]
        if not names:
            return
        ref_stats = _Accumulator()
        for ref, got in zip(capture(self.float_model, names, self.feeds), capture(candidate, names, self.feeds)):
            for name in names:
                if name in ref and name in got:
                    ref_stats.add(name, ref[name], got[name])
        for r in layers:
            if r.scheme != "float32" and r.output in ref_stats.signal:
                r.sqnr_db, r.cosine = ref_stats.result(r.output)


class _Accumulator:
    def __init__(self) -> None:
        self.signal: dict[str, float] = {}
        self.noise: dict[str, float] = {}
        self.cos: dict[str, list[float]] = {}

    def add(self, name: str, ref: np.ndarray, got: np.ndarray) -> None:
        a = np.asarray(ref, np.float64).ravel()
        b = np.asarray(got, np.float64).ravel()
        if a.shape != b.shape:
            return
        self.signal[name] = self.signal.get(name, 0.0) + float(a @ a)
        self.noise[name] = self.noise.get(name, 0.0) + float((a - b) @ (a - b))
        self.cos.setdefault(name, []).append(numerics.cosine(a, b))

    def result(self, name: str) -> tuple[float, float]:
        s, n = self.signal[name], self.noise[name]
        sqnr = float("inf") if n == 0 else (float("-inf") if s == 0 else 10 * math.log10(s / n))
        return sqnr, float(np.mean(self.cos[name]))


def output_metrics(reference: list[dict], got: list[dict], outputs: list[str]) -> dict[str, float]:
    """cosine (mean over batches and outputs), sqnr (dB over everything), top1-agreement (float outputs
    of rank >= 2 with a last axis of at least 2: argmax along it)."""
    cos, signal, noise, agree, total = [], 0.0, 0.0, 0, 0
    for ref, out in zip(reference, got):
        for name in outputs:
            a, b = ref.get(name), out.get(name)
            if a is None or b is None or np.asarray(a).dtype.kind not in "fc":
                continue
            a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
            if a64.shape != b64.shape:
                continue
            if a64.ndim >= 2:  # cosine per sample (row of the batch axis), as embeddings and logits are used
                for x, y in zip(a64.reshape(a64.shape[0], -1), b64.reshape(b64.shape[0], -1)):
                    cos.append(numerics.cosine(x, y))
            else:
                cos.append(numerics.cosine(a64, b64))
            signal += float((a64 * a64).sum())
            noise += float(((a64 - b64) ** 2).sum())
            if a64.ndim >= 2 and a64.shape[-1] >= 2:
                agree += int((a64.argmax(-1) == b64.argmax(-1)).sum())
                total += int(np.prod(a64.shape[:-1]))
    metrics: dict[str, float] = {}
    if cos:
        metrics["cosine"] = float(np.mean(cos))
        metrics["sqnr"] = float("inf") if noise == 0 else (float("-inf") if signal == 0 else 10 * math.log10(signal / noise))
    if total:
        metrics["top1-agreement"] = agree / total
    return metrics
