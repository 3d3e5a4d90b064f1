"""Transformer specifics: which channel groups are attention heads or FFN neurons, and the metadata.

The dependency analysis (``groups.py``) already follows attention: the
Reshape of a Q / K / V projection into (heads, head_dim) makes a space whose
indices are whole heads, the QK and PV MatMuls join the query, key and value
head spaces, the GQA repeat (Unsqueeze / Expand / Reshape merging kv heads
with their repeat count) maps each KV head to its query group, and the
merge back to (heads * head_dim) feeds the output projection. A unit of such
a group is therefore one KV head with its whole query group (one head
without GQA): pruning keeps Q / K / V / O consistent, the query-per-KV ratio
and head_dim unchanged, and the dynamic shape computations (``-1`` or
``Shape``-derived head counts) follow by themselves; constant head counts in
Reshape targets are rewritten.

Here: a group is ``heads`` when it contains a head space, ``hidden`` when a
LayerNorm / RMSNorm normalizes over its channels
(the residual stream: embeddings, norms, the projections reading and writing
it), ``ffn`` when every
layer it touches is a MatMul / Gemm and the model has attention (the
intermediate neurons of gate / up / down or fc1 / fc2 projections), otherwise
``channels``. ``update_metadata`` rewrites head, FFN and hidden sizes in the
architecture metadata (``compiler/ir/metadata.py``) when it has them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from compiler.ir.metadata import get_metadata, set_metadata
from passes.prune.groups import Analysis, Group

LINEAR = frozenset({"MatMul", "Gemm"})
#: metadata keys (HF config names and GGUF-style names) for each quantity
HEAD_KEYS = ("num_attention_heads", "n_head", "head_count", "heads")
KV_KEYS = ("num_key_value_heads", "n_head_kv", "head_count_kv", "kv_heads")
FFN_KEYS = ("intermediate_size", "n_inner", "feed_forward_length", "ffn_dim")
HIDDEN_KEYS = ("hidden_size", "n_embd", "embedding_length", "d_model")


def group_kinds(analysis: Analysis) -> dict[int, str]:
    has_attention = any(g.kind == "heads" for g in analysis.groups)
    kinds = {}
    for g in analysis.groups:
        if g.kind == "heads":
            kinds[g.id] = "heads"
            continue
        if g.normalized:
            kinds[g.id] = "hidden"
            continue
        ops = {t.node.op_type for t in analysis.touches
               if t.space in g.spaces and t.role in ("out", "in", "dw")}
        kinds[g.id] = "ffn" if has_attention and ops and ops <= LINEAR else "channels"
    return kinds


def head_counts(analysis: Analysis, group: Group, kept_units: int | None = None) -> tuple[int, int]:
    """(query heads, kv heads) of an attention group, before pruning or with ``kept_units`` units."""
    sizes = [analysis.spaces[s].size for s in group.spaces if analysis.spaces[s].kind == "heads"]
    q, kv = max(sizes), min(sizes)
    units = len(group.units)
    if kept_units is None:
        return q, kv
    return q * kept_units // units, kv * kept_units // units


def ffn_width(analysis: Analysis, group: Group, kept: dict[int, np.ndarray]) -> tuple[int, int]:
    """(before, after) width of an FFN group: its widest space written by a layer."""
    out_spaces = {t.space for t in analysis.touches if t.role == "out" and t.space in group.spaces}
    sid = max(out_spaces or group.spaces, key=lambda s: analysis.spaces[s].size)
    before = analysis.spaces[sid].size
    return before, len(kept[sid]) if sid in kept else before


def update_metadata(model: ir.Model, layers: list[dict[str, Any]]) -> bool:
    """Write pruned head / FFN sizes into the architecture metadata; ``layers`` holds per attention or FFN
    group {"kind", "before", "after"} (heads: (q, kv) pairs). False when there is no architecture metadata."""
    meta = get_metadata(model)
    arch = meta.architecture
    if not arch:
        return False
    heads = [layer for layer in layers if layer["kind"] == "heads"]
    ffn = [layer for layer in layers if layer["kind"] == "ffn"]
    hidden = [layer for layer in layers if layer["kind"] == "hidden"]
    if heads:
        _put(arch, HEAD_KEYS, [layer["after"][0] for layer in heads])
        _put(arch, KV_KEYS, [layer["after"][1] for layer in heads])
    if ffn:
        _put(arch, FFN_KEYS, [layer["after"] for layer in ffn])
    if hidden:
        _put(arch, HIDDEN_KEYS, [layer["after"] for layer in hidden])
    arch["pruned"] = True
    set_metadata(model, meta)
    return True


def _put(arch: dict[str, Any], keys: tuple[str, ...], values: list[int]) -> None:
    value: Any = values[0] if len(set(values)) == 1 else values  # per layer when the layers differ
    for key in keys:
        if key in arch:
            arch[key] = value
