"""Exact selection for groups with grouped convolutions: a small integer program per channel group.

A grouped convolution needs every one of its ``G`` groups to keep as many
channels (``groups.Balance``). In ShuffleNet the trunk is one coupled group
whose units (a channel and its copies through the concatenated shortcuts)
fall into different blocks of different convolutions, and a ranking pruned
one unit at a time cannot be patched into balance (the blocks of one conv
misalign with those of the next). So for every group with a balance
constraint the choice is made at once, as a mixed-integer program (HiGHS via
``scipy.optimize.milp``):

- ``x_u`` in {0, 1}: unit ``u`` is pruned (locked units are fixed at 0);
- per constraint ``b`` and block ``g``: sum_u count(u, b, g) x_u = t_b, the
  same integer ``t_b`` for every block of ``b``;
- per partition ``p``: at most the ranking's count of units is pruned (the
  ratio is a ceiling), and the kept count is a multiple of the partition's
  quantum (``round_to``) or the whole partition;
- objective: the channels pruned, each unit giving back under half a channel
  by its normalized score (more channels first, then the least important).

The rounding quantum can make a group infeasible beyond pruning nothing (two
partitions whose counts the shuffle ties by a factor the quantum does not
divide); the quantum is then halved until the solution prunes at least 90 %
of what the ratios ask, or reaches 1.
"""

from __future__ import annotations

import numpy as np

from passes.prune.groups import Analysis

#: seconds HiGHS may spend on one group
TIME_LIMIT = 20.0
#: a quantum is accepted when its solution prunes this share of the channels the ratios ask for
ENOUGH = 0.9


def balanced_selection(analysis: Analysis, parts, pruned: set[int]) -> list[str]:
    """Re-choose the pruned units of every group with a balance constraint, in place; notes for the report."""
    notes: list[str] = []
    by_group: dict[int, list] = {}
    space_group = {sid: g.id for g in analysis.groups for sid in g.spaces}
    for b in analysis.balances:
        by_group.setdefault(space_group[b.space], []).append(b)
    for gid, constraints in by_group.items():
        members = [p for p in parts if p.group.id == gid]
        if not members or not any(p.pruned for p in members):
            continue
        free = [u for p in members for u in p.units if u.id not in p.locked]
        for u in free:
            pruned.discard(u.id)
        chosen, quantum_div = _solve(members, constraints, analysis)
        if chosen is None:
            notes.append(f"group {gid}: no balanced choice for its grouped convolutions was found; left unpruned")
            for p in members:
                p.pruned = []
            continue
        pruned.update(chosen)
        for p in members:
            p.pruned = [u.id for u in p.units if u.id in chosen]
        if quantum_div > 1:
            notes.append(f"group {gid}: kept counts rounded to 1/{quantum_div} of round-to so its grouped "
                         "convolutions stay balanced")
    return notes


def _solve(parts, constraints, analysis: Analysis) -> tuple[set[int] | None, int]:
    """(unit ids to prune, the divisor of round-to that gave them)."""
    target = sum(len(p.pruned) for p in parts)
    best: tuple[set[int] | None, int] = (None, 1)
    best_size = -1
    div = 1
    top = max(p.quantum for p in parts)
    while True:
        chosen = _milp(parts, constraints, analysis, div)
        if chosen is not None:
            size = len(chosen)
            if size > best_size:
                best, best_size = (chosen, div), size
            if size >= ENOUGH * target:
                return best
        if top // div <= 1:
            return best
        div *= 2


def _milp(parts, constraints, analysis: Analysis, div: int) -> set[int] | None:
    """The unit ids to prune with every partition's quantum divided by ``div``, or None (no solution)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    units = [(p_i, u) for p_i, p in enumerate(parts) for u in p.units if u.id not in p.locked]
    n = len(units)
    index = {u.id: i for i, (_, u) in enumerate(units)}
    upper = [1.0] * n  # column bounds: the x's, then the helper integers appended below
    rows: list[tuple[dict[int, float], float, float]] = []  # ({column: coefficient}, low, high)

    def column(bound: float) -> int:
        upper.append(bound)
        return len(upper) - 1

    for b in constraints:
        block = analysis.spaces[b.space].size // b.blocks
        per_block: list[dict[int, float]] = [{} for _ in range(b.blocks)]
        for _, u in units:
            ch = u.channels.get(b.space)
            if ch is None:
                continue
            counts = np.bincount(ch // block, minlength=b.blocks)
            for g in np.nonzero(counts)[0]:
                per_block[g][index[u.id]] = float(counts[g])
        if not any(per_block):
            continue
        t = column(np.inf)  # the channels every block of this conv loses
        rows.extend(({**coefs, t: -1.0}, 0.0, 0.0) for coefs in per_block)
    for p in parts:
        cols = {index[u.id]: 1.0 for u in p.units if u.id in index}
        if not cols:
            continue
        rows.append((cols, 0.0, float(len(p.pruned))))  # the ratio is a ceiling
        q, total = max(1, p.quantum // div), len(p.units)
        if q > 1:  # kept = q * k with k >= 1, or the whole partition (z = 1)
            k, z = column(float(total // q)), column(1.0)
            rows.append(({**cols, k: float(q), z: float(total)}, float(total), float(total)))
            rows.append(({k: 1.0, z: float(total // q)}, 0.0, float(total // q)))
            rows.append(({k: 1.0, z: 1.0}, 1.0, np.inf))
    width = len(upper)
    a = np.zeros((len(rows), width))
    for r, (coefs, _, _) in enumerate(rows):
        for c, v in coefs.items():
            a[r, c] = v
    # more channels first; each unit gives back under half a channel by its normalized score
    prio = _priorities(parts, units)
    cost = np.zeros(width)
    cost[:n] = [-float(u.size) for _, u in units]
    if n:
        cost[:n] += 0.5 * prio / max(float(prio.max()), 1e-12)
    result = milp(cost, integrality=np.ones(width), bounds=Bounds(np.zeros(width), np.asarray(upper)),
                  constraints=LinearConstraint(a, [r[1] for r in rows], [r[2] for r in rows]),
                  options={"time_limit": TIME_LIMIT, "mip_rel_gap": 1e-4})
    if result.x is None:
        return None
    return {units[i][1].id for i in range(n) if result.x[i] > 0.5}


def _priorities(parts, units) -> np.ndarray:
    """Each unit's score divided by its partition's mean score (what a local ranking compares)."""
    normalized: dict[int, float] = {}
    for p in parts:
        scores = p.scores if p.scores is not None else np.ones(len(p.units))
        mean = float(np.mean(scores)) or 1.0
        normalized.update((u.id, max(float(s), 0.0) / mean) for s, u in zip(scores, p.units))
    return np.asarray([normalized[u.id] for _, u in units])
