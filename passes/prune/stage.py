"""The prune stage of a compile: analyze, score, select, rewrite, recover, report.

``prune_model(model, spec, options, calibration)`` prunes ``model`` in place
and returns a ``PruneReport`` (written into the artifact as ``pruning.json``):
parameters, bytes and MACs before/after for the model and for each group, the
groups left alone and why, and the least-squares refits.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from compiler.errors import KilnError
from compiler.progress import Progress
from passes.cleanup._shape_inference import infer_missing_shapes, restore
from passes.prune import cost, transformer
from passes.prune.apply import apply_selection
from passes.prune.criteria import Scorer, default_round_to, partitions, protected_spaces, select
from passes.prune.groups import Analysis, analyze
from passes.prune.options import PruneOptions
from passes.prune.params import model_params
from passes.prune.shapes import probe_shapes
from passes.quantize.core import ensure_node_names

#: calibration batches used at most (scores and refits)
MAX_BATCHES = 32


@dataclasses.dataclass
class PruneReport:
    spec: str
    round_to: int
    model: dict[str, Any]
    groups: list[dict[str, Any]]
    left_alone: list[dict[str, Any]]
    recovery: list[dict[str, Any]] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema": 1, "spec": self.spec, "round_to": self.round_to, "model": self.model,
                               "groups": self.groups, "left_alone": self.left_alone}
        if self.recovery is not None:
            out["recovery"] = {"method": "lstsq", "layers": self.recovery}
        if self.notes:
            out["notes"] = self.notes
        return out

    def summary(self) -> list[str]:
        m = self.model
        pruned = [g for g in self.groups if g["channels_after"] < g["channels_before"]]
        lines = [
            f"pruned {len(pruned)} of {len(self.groups) + len(self.left_alone)} channel groups ({self.spec}): "
            f"parameters {m['params_before']:,} -> {m['params_after']:,} ({_pct(m['params_before'], m['params_after'])}), "
            f"MACs {m['macs_before']:,} -> {m['macs_after']:,} ({_pct(m['macs_before'], m['macs_after'])})",
        ]
        if self.left_alone:
            lines.append(f"{len(self.left_alone)} group(s) left alone (see pruning.json)")
        if self.recovery:
            done = [r for r in self.recovery if "relative_error_after" in r and not r.get("skipped")]
            if done:
                before = np.mean([r["relative_error_before"] for r in done])
                after = np.mean([r["relative_error_after"] for r in done])
                lines.append(f"lstsq refit {len(done)} layer(s): mean relative output error {before:.4f} -> {after:.4f}")
        return lines


def _pct(before: int, after: int) -> str:
    return f"-{100 * (before - after) / before:.1f}%" if before else "n/a"


def prune_model(model: ir.Model, spec: Any, options: PruneOptions, calibration: Any = None, *,
                quiet: bool = True, log: Callable[[str], None] | None = None) -> PruneReport:
    """Prune ``model`` in place as ``options`` says for the target ``spec`` (``TargetSpec`` or None)."""
    say = log or (lambda _m: None)
    start = time.perf_counter()
    if options.needs_calibration and calibration is None:
        need = "criterion=activation" if options.criterion == "activation" else f"--prune-recover {options.recover}"
        raise KilnError(f"{need} needs calibration data",
                        hint="pass --calibration PATH (.npz of inputs, a folder of .npz/.npy files, or a folder of images)")
    batches = _batches(calibration)
    ensure_node_names(model.graph)
    round_to = options.round_to or default_round_to(spec)
    params_before, bytes_before, embed_before = model_params(model)
    weights_before = cost.weight_sizes(model)

    undo: list = []
    infer_missing_shapes(model, undo)
    try:
        probed = probe_shapes(model)
        analysis = analyze(model, probed)
        positions = cost.layer_positions(model, probed)
    finally:
        restore(undo)
    macs_before = cost.layer_macs(model, positions)
    kinds = transformer.group_kinds(analysis)
    parts = partitions(analysis, kinds, options, round_to)

    activations = _activation_norms(model, analysis, parts, batches) if options.criterion == "activation" else None
    scorer = Scorer(analysis, options.criterion, activations)
    with Progress("scoring channels", len(parts), quiet=quiet) as bar:
        for p in parts:
            p.scores = scorer.score(p)
            bar.update(1)
    notes = []
    if scorer.fallbacks:
        notes.append(f"criterion bn-gamma: {scorer.fallbacks} partition(s) have no normalization scale; ranked by l2")
    selection = select(analysis, parts, options)
    notes.extend(selection.notes)
    original = ir.from_proto(ir.to_proto(model)) if options.recover != "none" and selection.kept else None
    apply_selection(model, analysis, selection.kept)

    recovery = None
    if options.recover == "lstsq":
        from passes.prune.recover import plan_refits, refit

        layers = plan_refits(model, analysis, selection.kept)
        if original is not None:
            with Progress("refitting layers", len([layer for layer in layers if not layer.skipped]), quiet=quiet) as bar:
                refit(original, model, layers, batches, progress=lambda name: bar.update(1, name))
        recovery = [layer.to_json() for layer in layers]

    params_after, bytes_after, embed_after = model_params(model)
    macs_after = cost.layer_macs(model, positions)
    weights_after = cost.weight_sizes(model)
    groups, left_alone, arch = _group_rows(analysis, kinds, selection, options, weights_before, weights_after,
                                           macs_before, macs_after)
    if transformer.update_metadata(model, arch):
        notes.append("architecture metadata updated with the pruned head and FFN sizes")
    model_row = {
        "params_before": params_before, "params_after": params_after,
        "non_embedding_params_before": params_before - embed_before,
        "non_embedding_params_after": params_after - embed_after,
        "bytes_before": bytes_before, "bytes_after": bytes_after,
        "macs_before": cost.total_macs(macs_before), "macs_after": cost.total_macs(macs_after),
        "macs_note": "weighted layers, one sample, symbolic dims (batch, sequence) taken as 1",
    }
    report = PruneReport(options.spec(), round_to, model_row, groups, left_alone, recovery, notes,
                         time.perf_counter() - start)
    for line in report.summary():
        say(line)
    return report


def _batches(calibration: Any) -> list[dict[str, np.ndarray]]:
    if calibration is None:
        return []
    batches = []
    for feed in calibration:
        batches.append(dict(feed))
        if len(batches) >= MAX_BATCHES:
            break
    return batches


def _activation_norms(model: ir.Model, analysis: Analysis, parts, batches) -> dict[str, np.ndarray]:
    """Per reading layer: the per-channel L2 norm of its input over the calibration batches."""
    from passes.quantize.capture import capture

    sids = {s for p in parts for u in p.units for s in u.channels}
    readers = {}
    for t in analysis.touches:
        if t.role == "in" and t.space in sids:
            value = t.node.inputs[0]
            axis = next((a for v, a in analysis.spaces[t.space].members if v is value), None)
            if axis is not None:
                readers[t.node.name] = (value.name, axis)
    sums: dict[str, np.ndarray] = {}
    names = sorted({v for v, _ in readers.values()})
    for got in capture(model, names, batches, chunk=32):
        for layer, (name, axis) in readers.items():
            x = np.moveaxis(np.asarray(got[name], np.float64), axis, 0)
            sq = (x.reshape(x.shape[0], -1) ** 2).sum(axis=1)
            sums[layer] = sums.get(layer, 0) + sq
    return {k: np.sqrt(v) for k, v in sums.items()}


def _group_rows(analysis: Analysis, kinds, selection, options: PruneOptions, w_before, w_after, macs_before,
                macs_after):
    protected = protected_spaces(analysis, options, kinds)
    weights_of: dict[int, set[tuple[str, int]]] = {}
    layers_of: dict[int, set[str]] = {}
    for t in analysis.touches:
        weights_of.setdefault(t.space, set()).add((t.node.name, t.index))
        if t.role in ("out", "in", "dw"):
            layers_of.setdefault(t.space, set()).add(t.node.name)
    rows, left, arch = [], [], []
    pruned_units = selection.pruned_units
    for g in analysis.groups:
        kind = kinds[g.id]
        keys = set().union(*(weights_of.get(s, set()) for s in g.spaces))
        layers = sorted(set().union(*(layers_of.get(s, set()) for s in g.spaces)))
        if not layers:
            continue
        kept_units = sum(1 for u in g.units if u.id not in pruned_units)
        producer = [s for s in g.spaces if any(t.role in ("out", "dw") and t.space == s for t in analysis.touches)]
        ch_before = sum(analysis.spaces[s].size for s in producer) or sum(analysis.spaces[s].size for s in g.spaces)
        ch_after = sum(len(selection.kept.get(s, range(analysis.spaces[s].size)))
                       for s in (producer or g.spaces))
        why = list(g.blocked) + (list(g.soft) if kind != "hidden" else [])
        why += sorted({protected[s] for s in g.spaces if s in protected})
        candidate = any(p.group is g for p in selection.partitions)
        if not candidate:
            reason = why or ([f"{kind}=0 in the spec"] if options.ratio(kind) <= 0 else ["nothing prunable"])
            left.append({"group": g.id, "kind": kind, "layers": layers, "channels": ch_before, "reasons": reason})
            continue
        row = {
            "group": g.id, "kind": kind, "layers": layers,
            "channels_before": ch_before, "channels_after": ch_after,
            "units_before": len(g.units), "units_after": kept_units,
            "params_before": sum(w_before.get(k, (0, 0))[0] for k in keys),
            "params_after": sum(w_after.get(k, (0, 0))[0] for k in keys),
            "bytes_before": sum(w_before.get(k, (0, 0))[1] for k in keys),
            "bytes_after": sum(w_after.get(k, (0, 0))[1] for k in keys),
            "macs_before": sum(macs_before.get(n, 0) for n in layers),
            "macs_after": sum(macs_after.get(n, 0) for n in layers),
        }
        if kind == "heads":
            (q, kv), (q2, kv2) = transformer.head_counts(analysis, g), transformer.head_counts(analysis, g, kept_units)
            row.update({"heads_before": q, "heads_after": q2, "kv_heads_before": kv, "kv_heads_after": kv2})
            arch.append({"kind": "heads", "before": (q, kv), "after": (q2, kv2)})
        elif kind in ("ffn", "hidden"):
            before, after = transformer.ffn_width(analysis, g, selection.kept)
            arch.append({"kind": kind, "before": before, "after": after})
            row.update({"width_before": before, "width_after": after})
        if why:
            row["kept_because"] = why
        rows.append(row)
    return rows, left, arch


def prune_path(source: Any, spec_text: str, target: str = "x86_64-linux-gnu", **kwargs: Any) -> tuple[ir.Model, PruneReport]:
    """Import ``source``, run -O1, prune: for benches and tests that want the IR without a compile."""
    from compiler.importers.onnx_file import import_onnx
    from compiler.passes import PassManager, opt_level_pipeline
    from passes.prune.options import parse_prune
    from targets.triple import resolve_target

    model, _ = import_onnx(source)
    PassManager(opt_level_pipeline(kwargs.pop("opt_level", 1))).run(model)
    options = parse_prune(spec_text, kwargs.pop("recover", None))
    report = prune_model(model, resolve_target(target), options, kwargs.pop("calibration", None), **kwargs)
    PassManager("eliminate-dead").run(model)
    return model, report

