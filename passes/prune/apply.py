"""Rewrite the model for a selection: slice weights, fix shape constants, attributes and dims.

Every change comes from a record of the analysis (``groups.py``); a space keeps
its channels in their original order, so each weight is ``np.take`` of the
kept indices along the recorded axis.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from passes.prune.groups import Analysis
from passes.prune.params import Rewriter, find_param
from passes.prune.restore import fill_values, restore_output
from passes.prune.shapes import const_ints


def apply_selection(model: ir.Model, analysis: Analysis, kept: dict[int, np.ndarray]) -> None:
    """Prune ``model`` in place: ``kept`` maps each shrinking space to its kept channel indices."""
    if not kept:
        return
    graph = model.graph
    rw = Rewriter(graph)
    sizes = {sid: len(k) for sid, k in kept.items()}
    outputs = [(t, fill_values(t, analysis.spaces[t.space].size)) for t in analysis.output_touches if t.space in kept]

    # weights: every axis of one input at once
    cuts: dict[tuple[int, int], tuple[ir.Node, int, dict[int, list[int]]]] = {}
    grouped: list[tuple[ir.Node, int, int, np.ndarray]] = []
    for t in analysis.touches:
        if t.space not in kept:
            continue
        idx = kept[t.space]
        if t.mod:
            grouped.append((t.node, t.index, t.mod, idx))
            continue
        picks = [int(i) for i in idx]
        entry = cuts.setdefault((id(t.node), t.index), (t.node, t.index, {}))
        previous = entry[2].get(t.axis)
        assert previous is None or previous == picks, f"{t.node.name}: input {t.index} pruned two ways"
        entry[2][t.axis] = picks
    # grouped convs first: their input columns differ per group (the output rows are cut after)
    for node, index, per_group, idx in grouped:
        _slice_grouped(rw, node, index, per_group, idx)
    for node, index, axes in cuts.values():
        rw.slice(node, index, sorted(axes.items()))

    for t in analysis.attr_touches:
        if t.space in kept:
            t.node.attributes[t.attr] = ir.AttrInt64(t.attr, sizes[t.space])

    # shape constants: one rewritten copy per reading input
    shape_edits: dict[tuple[int, int], tuple[ir.Node, int, dict[int, int]]] = {}
    for t in analysis.shape_touches:
        if t.space in kept:
            entry = shape_edits.setdefault((id(t.reader), t.index), (t.reader, t.index, {}))
            entry[2][t.position] = sizes[t.space] // t.div
    for reader, index, edits in shape_edits.values():
        _edit_ints(rw, reader, index, edits)

    for t in analysis.slice_touches:
        if t.space not in kept:
            continue
        keep = kept[t.space]
        start = int(np.searchsorted(keep, t.start))
        end = int(np.searchsorted(keep, t.end))
        _edit_ints(rw, t.node, 1, {t.position: start})
        _edit_ints(rw, t.node, 2, {t.position: end})

    for t in analysis.split_touches:
        if not any(s in kept for s in t.spaces):
            continue
        new = [sizes.get(s, analysis.spaces[s].size) for s in t.spaces]
        _set_split(rw, model, t.node, new)

    for sid, keep in kept.items():
        for value, axis in analysis.spaces[sid].members:
            _set_dim(value, axis, len(keep))
    for t in analysis.dim_touches:
        if t.space in kept:
            _set_dim(t.value, t.axis, sizes[t.space] // t.div)
    for t, fill in outputs:
        restore_output(model, rw, t, kept[t.space], analysis.spaces[t.space].size, fill)


def _slice_grouped(rw: Rewriter, node: ir.Node, index: int, per_group: int, keep: np.ndarray) -> None:
    """The filters of group g keep the columns (kept channels of block g) - g * per_group."""
    param = find_param(node.inputs[index])
    groups = int(node.attributes["group"].value)
    by_group = [keep[(keep >= g * per_group) & (keep < (g + 1) * per_group)] - g * per_group for g in range(groups)]
    sizes = {len(b) for b in by_group}
    assert len(sizes) == 1, f"{node.name}: groups keep different channel counts {sorted(sizes)}"
    if param.kind == "fill":
        rw.slice(node, index, [(1, list(range(sizes.pop())))])
        return
    data = param.array()
    rows = param.shape[0] // groups
    parts = [np.take(data[g * rows : (g + 1) * rows], b, axis=1) for g, b in enumerate(by_group)]
    rw.set_const(node, index, np.ascontiguousarray(np.concatenate(parts, axis=0)))


def _edit_ints(rw: Rewriter, node: ir.Node, index: int, edits: dict[int, int]) -> None:
    value = node.inputs[index]
    ints = const_ints(value)
    assert ints is not None, f"{node.name}: input {index} is not a constant"
    for pos, v in edits.items():
        ints[pos] = v
    dtype = value.const_value.numpy().dtype
    rw.set_const(node, index, np.asarray(ints, dtype=dtype).reshape(value.const_value.numpy().shape))


def _set_split(rw: Rewriter, model: ir.Model, node: ir.Node, sizes: list[int]) -> None:
    if "split" in node.attributes:
        node.attributes["split"] = ir.AttrInt64s("split", sizes)
        return
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        rw.set_const(node, 1, np.asarray(sizes, dtype=np.int64))
        return
    if model.opset_imports.get("", 1) < 13:
        node.attributes["split"] = ir.AttrInt64s("split", sizes)
        return
    value = ir.Value(name=rw.fresh(f"{node.name or 'split'}_sizes"), shape=ir.Shape([len(sizes)]),
                     type=ir.TensorType(ir.DataType.INT64))
    value.const_value = ir.tensor(np.asarray(sizes, dtype=np.int64), name=value.name)
    rw.graph.register_initializer(value)
    if len(node.inputs) < 2:
        node.resize_inputs(2)
    node.replace_input_with(1, value)
    node.attributes.pop("num_outputs", None)


def _set_dim(value: ir.Value, axis: int, size: int) -> None:
    shape = value.shape
    if shape is None or axis >= len(shape) or not isinstance(shape[axis], int):
        return
    dims = list(shape)
    dims[axis] = size
    value.shape = ir.Shape(dims)


def weight_numel(node: ir.Node, index: int) -> int:
    param = find_param(node.inputs[index]) if index < len(node.inputs) else None
    return 0 if param is None else param.numel
