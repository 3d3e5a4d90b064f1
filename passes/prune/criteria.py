"""Which units to prune: importance scores, ratios per group or global, rounding, protection.

Scores (higher = more important) are computed per unit from the weights its
channels touch, each weight's per-channel figure divided by that weight's mean
so big and small layers weigh the same:

- ``l1`` / ``l2``: the norm of the output filters, input columns and depthwise
  filters of the unit's channels (for the hidden size, every coupled tensor:
  the norms' scales and biases too, which keep the residual stream's outlier
  channels);
- ``bn-gamma``: ``|gamma|`` of the BatchNormalization / InstanceNormalization
  (or constant per-channel multiplier) on the channels; groups without one fall
  back to ``l2`` (the report says so);
- ``activation``: for every layer that reads the channels, ``||W[:, c]||_2 *
  ||x_c||_2`` with ``x`` its input on the calibration data: the first-order
  size of the change to its output when channel ``c`` goes.

Selection works per *partition*: the units of a group that span the same spaces
(the units of one convolution's output inside a Concat group, say). ``local``
removes ``ratio`` of each partition; ``global`` ranks all partitions of a kind
by normalized score and cuts at one threshold (at most ``max-ratio`` of any
partition). Kept counts are rounded to multiples of ``round_to`` channels
(nearest, never to zero). Units touching a blocked or protected space are kept.
Groups with grouped convolutions are then chosen exactly (``balance.py``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from passes.prune.balance import balanced_selection
from passes.prune.groups import Analysis, Group, Touch, Unit
from passes.prune.options import PruneOptions
from passes.prune.params import find_param

MAGNITUDE_ROLES = ("out", "in", "dw")


def default_round_to(spec: Any) -> int:
    """Kept channel counts are multiples of this on the target: two float32 vector registers' worth
    (8 on 128-bit SIMD: SSE, NEON, wasm simd128; 16 with AVX/AVX2; 32 with AVX-512), 8 on GPUs
    (tensor-core tiles), 1 without a vector unit. Read from the spec's LLVM features."""
    if spec is None:
        return 8
    if getattr(spec, "device", "cpu") != "cpu":
        return 8
    features = {f.lstrip("+") for f in getattr(spec, "features", ())}
    features |= {f.lstrip("+") for f in spec.llvm.get("mattr", [])} if hasattr(spec, "llvm") else set()
    if any(f.startswith("avx512") for f in features):
        return 32
    if features & {"avx", "avx2", "fma"}:
        return 16
    if features & {"neon", "sse4.2", "sse4.1", "ssse3", "sse3", "sse2", "simd128", "v", "altivec", "vsx"}:
        return 8
    return 1


@dataclasses.dataclass
class Partition:
    group: Group
    kind: str
    units: list[Unit]
    #: units that must stay (blocked or protected)
    locked: set[int]
    quantum: int  # kept unit counts are multiples of this
    scores: np.ndarray | None = None
    pruned: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Selection:
    pruned_units: set[int]
    kept: dict[int, np.ndarray]  # space -> kept channel indices (only spaces that lose channels)
    partitions: list[Partition]
    notes: list[str]


def protected_spaces(analysis: Analysis, options: PruneOptions, kinds: dict[int, str] | None = None) -> dict[int, str]:
    """Space id -> why it is protected. The first / last defaults do not hold for the hidden size (its
    first layer is the embedding table; its readers and writers are all the transformer's layers)."""
    out: dict[int, str] = {}
    hidden = {s for g in analysis.groups if kinds and kinds.get(g.id) == "hidden" for s in g.spaces}
    for sid, space in analysis.spaces.items():
        if sid in hidden:
            continue
        if options.protect_first and space.first:
            out[sid] = "first layer"
        elif options.protect_last and space.last:
            out[sid] = "last layer"
    names = set(options.protect)
    if names:
        for t in analysis.touches:
            if t.node.name in names and t.role in ("out", "dw"):
                out.setdefault(t.space, f"protected layer {t.node.name}")
    return out


def partitions(analysis: Analysis, kinds: dict[int, str], options: PruneOptions, round_to: int) -> list[Partition]:
    protected = protected_spaces(analysis, options, kinds)
    out: list[Partition] = []
    for group in analysis.groups:
        kind = kinds[group.id]
        if options.ratio(kind) <= 0:
            continue
        if group.soft and kind != "hidden":
            continue
        by_key: dict[tuple, list[Unit]] = {}
        for unit in group.units:
            key = tuple(sorted((sid, len(ch)) for sid, ch in unit.channels.items()))
            by_key.setdefault(key, []).append(unit)
        for key, units in by_key.items():
            locked = {u.id for u in units if any(analysis.spaces[s].blocked or s in protected for s in u.channels)}
            if len(locked) == len(units):
                continue
            quantum = 1
            if kind != "heads":
                for _sid, mult in key:
                    quantum = _lcm(quantum, round_to // math.gcd(round_to, mult))
            out.append(Partition(group, kind, units, locked, quantum))
    return out


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


# --------------------------------------------------------------------------- scores


class Scorer:
    def __init__(self, analysis: Analysis, criterion: str, activations: dict[str, np.ndarray] | None = None) -> None:
        """``activations``: per layer name, the per-channel L2 norm of its input on the calibration data."""
        self.analysis = analysis
        self.criterion = criterion
        self.activations = activations or {}
        self.by_space: dict[int, list[Touch]] = {}
        for t in analysis.touches:
            self.by_space.setdefault(t.space, []).append(t)
        self._norms: dict[tuple, np.ndarray] = {}
        self.fallbacks = 0

    def norms(self, t: Touch, order: int) -> np.ndarray:
        key = (id(t.node), t.index, t.axis, order)
        if key not in self._norms:
            param = find_param(t.node.inputs[t.index])
            if param is None:
                self._norms[key] = np.ones(1)
            elif t.role in ("gamma", "scale"):
                self._norms[key] = np.abs(np.moveaxis(np.asarray(param.array(), np.float64), t.axis, 0)
                                          .reshape(param.shape[t.axis], -1)).mean(axis=1)
            elif t.mod:  # grouped conv input: column j of group g's filters is channel g * mod + j
                groups = int(t.node.attributes["group"].value)
                w = np.asarray(param.array(), np.float64).reshape(groups, param.shape[0] // groups, t.mod, -1)
                w = np.moveaxis(w, 2, 1).reshape(groups * t.mod, -1)
                self._norms[key] = np.abs(w).sum(axis=1) if order == 1 else np.sqrt((w * w).sum(axis=1))
            else:
                self._norms[key] = param.norms(t.axis, order)
        return self._norms[key]

    def score(self, part: Partition) -> np.ndarray:
        roles: tuple[str, ...]
        order = 1 if self.criterion == "l1" else 2
        if self.criterion == "bn-gamma":
            roles = ("gamma",)
            if not self._has(part, roles):
                roles = ("scale",)
            if not self._has(part, roles):
                roles, order = MAGNITUDE_ROLES, 2
                self.fallbacks += 1
        elif self.criterion == "activation":
            roles = ("in",)
        else:
            roles = MAGNITUDE_ROLES
        if part.kind == "hidden" and self.criterion in ("l1", "l2"):
            roles = MAGNITUDE_ROLES + ("gamma", "scale", "other")  # every coupled tensor: norms and biases too
        values = np.zeros(len(part.units))
        for i, unit in enumerate(part.units):
            parts = []
            for sid, channels in unit.channels.items():
                for t in self.by_space.get(sid, ()):
                    if t.role not in roles:
                        continue
                    if self.criterion == "activation" and t.node.name in self.activations:
                        parts.append(self._activation_term(t, channels, self.activations[t.node.name]))
                        continue
                    norms = self.norms(t, order)
                    mean = float(norms.mean())
                    parts.append(float(_take(norms, channels).mean()) / mean if mean > 0 else 1.0)
            values[i] = float(np.mean(parts)) if parts else 1.0
        return values

    def _activation_term(self, t: Touch, channels: np.ndarray, act: np.ndarray) -> float:
        w = self.norms(t, 2)
        per = _take(w, np.arange(len(act))) * act
        mean = float(per.mean())
        return float(per[channels].mean()) / mean if mean > 0 else 1.0

    def _has(self, part: Partition, roles: tuple[str, ...]) -> bool:
        sids = {s for u in part.units for s in u.channels}
        return any(t.role in roles for s in sids for t in self.by_space.get(s, ()))


def _take(norms: np.ndarray, channels: np.ndarray) -> np.ndarray:
    if len(norms) == 1 and channels.max(initial=0) > 0:
        return np.repeat(norms, len(channels))
    return norms[channels]


# --------------------------------------------------------------------------- selection


def select(analysis: Analysis, parts: list[Partition], options: PruneOptions) -> Selection:
    notes: list[str] = []
    if options.scope == "global":
        for kind in ("channels", "heads", "ffn", "hidden"):
            members = [p for p in parts if p.kind == kind]
            if members:
                _global_counts(members, options.ratio(kind), options.max_ratio)
    else:
        for p in parts:
            _local_count(p, options.ratio(p.kind))
    pruned: set[int] = set()
    for p in parts:
        pruned.update(p.pruned)
    if analysis.balances:
        notes.extend(balanced_selection(analysis, parts, pruned))
    removed: dict[int, list[np.ndarray]] = {}
    for p in parts:
        for unit in p.units:
            if unit.id in pruned:
                for sid, ch in unit.channels.items():
                    removed.setdefault(sid, []).append(ch)
    kept = {}
    for sid, chunks in removed.items():
        gone = np.unique(np.concatenate(chunks))
        keep = np.setdiff1d(np.arange(analysis.spaces[sid].size), gone)
        if len(keep) == 0:  # never empty a space: give back the best unit (cannot happen with quantum >= 1)
            raise AssertionError(f"pruning would empty space {sid}")
        kept[sid] = keep
    return Selection(pruned, kept, parts, notes)


def _order(p: Partition) -> list[Unit]:
    """Candidates from least to most important; ties pruned from the highest channel index."""
    scores = p.scores if p.scores is not None else np.ones(len(p.units))
    cands = [(float(s), -_first(u), u) for s, u in zip(scores, p.units) if u.id not in p.locked]
    cands.sort(key=lambda x: (x[0], x[1]))
    return [u for _, _, u in cands]


def _first(unit: Unit) -> int:
    sid = min(unit.channels)
    return int(unit.channels[sid][0])


def _round_keep(n: int, keep: float, quantum: int, locked: int) -> int:
    q = min(quantum, n)
    rounded = int(math.floor(keep / q + 0.5)) * q
    return max(rounded, q, locked, 1)


def _local_count(p: Partition, ratio: float) -> None:
    n = len(p.units)
    keep = _round_keep(n, n * (1 - ratio), p.quantum, len(p.locked))
    count = max(0, n - keep)
    p.pruned = [u.id for u in _order(p)[:count]]


def _global_counts(parts: list[Partition], ratio: float, max_ratio: float) -> None:
    entries = []
    for p in parts:
        scores = p.scores if p.scores is not None else np.ones(len(p.units))
        mean = float(np.mean(scores)) or 1.0
        for s, u in zip(scores, p.units):
            if u.id not in p.locked:
                entries.append((float(s) / mean, u.size))
    if not entries:
        return
    entries.sort()
    total = sum(size for _, size in entries)
    target, acc, threshold = ratio * total, 0, -math.inf
    for value, size in entries:
        if acc + size > target:
            break
        acc += size
        threshold = value
    for p in parts:
        scores = p.scores if p.scores is not None else np.ones(len(p.units))
        mean = float(np.mean(scores)) or 1.0
        n = len(p.units)
        below = sum(1 for s, u in zip(scores, p.units) if u.id not in p.locked and float(s) / mean <= threshold)
        below = min(below, int(n * max_ratio))
        keep = _round_keep(n, n - below, p.quantum, len(p.locked))
        p.pruned = [u.id for u in _order(p)[: max(0, n - keep)]]
