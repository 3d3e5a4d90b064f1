"""Scaled dot-product attention fusion: ``fuse-attention``.

Pattern (what torch's legacy exporter writes for transformers' eager attention
in BERT / MiniLM, GPT-2, LLaMA, Qwen2; anchored at the last MatMul)::

    scores = MatMul(Q, Transpose(K))            Q, K, V: (B, N, S, H) per head
    scores = Mul(scores, c) | Div(scores, c)    optional constant scale
    scores = Add(scores, mask)                  optional additive mask
    probs  = Softmax(scores, axis=-1) [-> no-op Cast]
    out    = MatMul(probs, V)                   (B, N, S, H)

Q and K may carry rotary embeddings (LLaMA/Qwen2) and K/V the GQA head
repeat (Unsqueeze/Expand/Reshape): they are inputs of the pattern, kept as
they are. The Transpose of K is (0, 1, 3, 2) of a BNSH key or (0, 2, 3, 1)
of the BSNH reshape of the projection (BERT, GPT-2).

Targets, chosen by measurement with onnxruntime 1.32 on this machine (CPU,
one thread, float32, one attention layer with B=1, S=128, N=12, H=32):

- model opset >= 23: the standard ``Attention`` op on the 4-D tensors, a
  drop-in for the subgraph (decomposed 850 us, Attention 805 us; same
  numbers). onnxruntime 1.32 computes a per-head (B, N, S, T) mask wrongly
  and rejects a mask that broadcasts over the query length, so the mask must
  have rank 2 or a static 1 in its head dim; it is expanded to (.., S, T)
  unless its last two dims are known to be S and T.
- ``contrib=true, gpu=true``: ``com.microsoft::MultiHeadAttention`` (query in
  (B, S, N*H), key/value 3-D or BNSH, the mask expanded to (B|1, N|1, S, T)
  as its attention_bias). On the CPU it measured no faster than the
  decomposed form (858 vs 870 us; onnxruntime runs it as the same GEMMs and
  softmax), so it is off unless asked for: it is the form onnxruntime's GPU
  execution providers run with fused (flash / memory-efficient) kernels.
- otherwise the subgraph is kept, and the refusal says why.

Legacy-exported ``sdpa`` attention (the IsNaN/Where after the Softmax that
zeroes fully masked rows) does not match and is kept.
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
    attr_int,
    attrs,
    binary,
    interior_problem,
    known_dims,
    known_dtype,
    opset_of,
    producer,
    replace,
    scalar,
    scoped,
    shape_entries,
    sole_user,
)

_KT_PERMS = ((0, 1, 3, 2), (0, 2, 3, 1))
_BNSH_FROM_BSNH = (0, 2, 1, 3)

#: Why the contrib form is off by default (measured, see the module docstring).
MHA_NOT_FASTER = (
    "com.microsoft MultiHeadAttention measured no faster than the decomposed form on "
    "onnxruntime's CPU (set gpu=true for GPU execution providers)"
)


@dataclasses.dataclass
class AttnMatch:
    pv: ir.Node  # MatMul(probs, V): the anchor
    softmax: ir.Node
    qk: ir.Node
    kt: ir.Node  # the Transpose making K^T
    q: ir.Value
    v: ir.Value
    nodes: list[ir.Node]  # nodes replaced (kt only when its output is used only by qk)
    mask: ir.Value | None = None
    scale: float = 1.0
    target: str = ""
    heads: tuple[int, int] | None = None  # (num_heads, head_size) for MultiHeadAttention

    @property
    def kt_perm(self) -> tuple[int, ...]:
        return tuple(self.kt.attributes["perm"].as_ints())


def _perm(node: ir.Node | None) -> tuple[int, ...] | None:
    if node is None:
        return None
    attr = node.attributes.get("perm")
    return None if attr is None else tuple(int(p) for p in attr.as_ints())


def match_attention(node: ir.Node) -> AttnMatch | None:
    operands = binary(node)
    if operands is None:
        return None
    probs, v = operands
    nodes: list[ir.Node] = []
    for _ in range(2):  # softmax(dtype=float32).to(query.dtype): no-op Casts in float32
        cast = producer(probs, "Cast")
        if cast is None:
            break
        nodes.insert(0, cast)
        probs = cast.inputs[0]
    softmax = producer(probs, "Softmax")
    if softmax is None:
        return None
    scores = softmax.inputs[0]
    mask = None
    add = producer(scores, "Add")
    if add is not None and binary(add) is not None:
        found = None
        for i in (0, 1):
            if _scores_chain(add.inputs[i]) is not None:
                found = i
                break
        if found is None:
            return None
        scores, mask = add.inputs[found], add.inputs[1 - found]
    chain = _scores_chain(scores)
    if chain is None:
        return None
    scale_node, scale, qk, kt = chain
    replaced = [qk] + ([scale_node] if scale_node is not None else []) + ([add] if mask is not None else [])
    nodes = replaced + [softmax, *nodes, node]
    if sole_user(kt.outputs[0]) is qk:
        nodes.insert(0, kt)
    return AttnMatch(node, softmax, qk, kt, qk.inputs[0], v, nodes, mask, scale)


def _scores_chain(value: ir.Value):
    """(scale node, scale, MatMul(Q, K^T), Transpose) for [Mul|Div by c](MatMul(Q, Transpose(K)))."""
    scale_node, scale = None, 1.0
    node = producer(value, "Mul", "Div")
    if node is not None and binary(node) is not None:
        a, b = node.inputs
        if node.op_type == "Div":
            c = scalar(b)
            if c is None or c == 0:
                return None
            scale_node, scale, value = node, 1.0 / c, a
        else:
            cb, ca = scalar(b), scalar(a)
            if cb is not None:
                scale_node, scale, value = node, cb, a
            elif ca is not None:
                scale_node, scale, value = node, ca, b
            else:
                return None
    qk = producer(value, "MatMul")
    if qk is None or binary(qk) is None:
        return None
    kt = producer(qk.inputs[1], "Transpose")
    if kt is None or _perm(kt) not in _KT_PERMS:
        return None
    return scale_node, scale, qk, kt


def _find_heads(q: ir.Value, depth: int = 8) -> tuple[int, int] | None:
    """(num_heads, head_size) from Q's dims or, through rotary-embedding
    arithmetic, from the Transpose(Reshape(projection)) that split the heads."""
    d = known_dims(q)
    if d is not None and len(d) == 4 and isinstance(d[1], int) and isinstance(d[3], int):
        return d[1], d[3]
    seen: set[ir.Value] = set()
    frontier = [q]
    for _ in range(depth):
        following = []
        for value in frontier:
            if value in seen or value is None:
                continue
            seen.add(value)
            node = value.producer()
            if node is None:
                continue
            if node.op_type == "Transpose" and _perm(node) == _BNSH_FROM_BSNH:
                found = _heads_of_split(node.inputs[0])
                if found is not None:
                    return found
                continue
            if node.op_type in ("Add", "Mul", "Sub", "Neg", "Concat", "Slice", "Cast"):
                following.extend(v for v in node.inputs[:2] if v is not None)
        frontier = following
    return None


def _heads_of_split(value: ir.Value) -> tuple[int, int] | None:
    """(N, H) of a (B, S, N, H) value made by Reshape(x (B, S, D), [.., .., N|-1, H])."""
    d = known_dims(value)
    if d is not None and len(d) == 4 and isinstance(d[2], int) and isinstance(d[3], int):
        return d[2], d[3]
    reshape = producer(value, "Reshape")
    if reshape is None or len(reshape.inputs) < 2:
        return None
    entries = shape_entries(reshape.inputs[1])
    if entries is None or len(entries) != 4:
        return None
    n, h = entries[2], entries[3]
    if not isinstance(h, int) or h <= 0:
        return None
    if isinstance(n, int) and n > 0:
        return n, h
    x = known_dims(reshape.inputs[0])
    if n == -1 and x is not None and isinstance(x[-1], int) and x[-1] % h == 0:
        return x[-1] // h, h
    return None


class AttentionRule(Rule):
    name: ClassVar[str] = "attention"
    anchors: ClassVar[tuple[str, ...]] = ("MatMul",)
    needs_shapes: ClassVar[bool] = True

    def __init__(self, contrib: bool, gpu: bool) -> None:
        self.contrib = contrib
        self.gpu = gpu

    def match(self, node: ir.Node, ctx: RewriteContext) -> AttnMatch | None:
        return match_attention(node)

    def check(self, m: AttnMatch, ctx: RewriteContext) -> str | None:
        t = known_dtype(m.q)
        if t not in FLOAT_TYPES:
            return f"query dtype {t} is not float, float16 or bfloat16"
        for node in m.nodes:
            if node.op_type == "Cast" and node is not m.pv:
                to = node.attributes.get("to")
                if to is None or ir.DataType(to.as_int()) != t:
                    return "a Cast between the Softmax and the last MatMul changes the dtype"
        axis = attr_int(m.softmax, "axis", -1)
        if axis not in (-1, 3):
            return f"Softmax axis {axis} is not the last axis"
        why = interior_problem(m.nodes, m.pv)
        if why:
            return why
        for what, value in (("query", m.q), ("value", m.v), ("key", m.kt.inputs[0])):
            d = known_dims(value)
            if d is not None and len(d) != 4:
                return f"{what} has rank {len(d)}, not 4"
        batch_heads = [known_dims(v) for v in (m.q, m.v)]
        for axis, what in ((0, "batch"), (1, "head")):
            sizes = {d[axis] for d in batch_heads if d is not None and len(d) == 4 and isinstance(d[axis], int)}
            if 1 in sizes and len(sizes) > 1:
                return f"the value broadcasts over the {what} dim"
        if m.mask is not None:
            d = known_dims(m.mask)
            if d is None:
                return "the mask's rank is unknown"
            if len(d) > 4:
                return f"the mask has rank {len(d)}"
        version = opset_of(ctx)
        if version >= 23:
            why = self._standard_mask_problem(m)
            if why is None:
                m.target = "Attention"
                return None
            if not (self.contrib and self.gpu):
                return why
        if self.contrib and self.gpu:
            heads = _find_heads(m.q)
            if heads is None:
                return "the number of heads is not known statically (MultiHeadAttention needs it)"
            m.heads = heads
            m.target = "MultiHeadAttention"
            return None
        if self.contrib:
            return MHA_NOT_FASTER
        return (
            f"Attention needs opset 23 (the model imports opset {version}); "
            "onnxruntime's MultiHeadAttention needs contrib=true and gpu=true"
        )

    @staticmethod
    def _standard_mask_problem(m: AttnMatch) -> str | None:
        if m.mask is None:
            return None
        d = known_dims(m.mask)
        if len(d) in (0, 1):
            return "the mask has rank < 2"
        if len(d) == 3 or (len(d) == 4 and d[1] != 1):
            # onnxruntime 1.32's Attention applies a per-head mask wrongly.
            return "the mask may have a head dim (onnxruntime's Attention mishandles per-head masks)"
        return None

    def rewrite(self, m: AttnMatch, ctx: RewriteContext) -> None:
        if m.target == "Attention":
            self._rewrite_standard(m, ctx)
        else:
            self._rewrite_mha(m, ctx)

    # ------------------------------------------------------------ helpers

    @staticmethod
    def _key_bnsh(m: AttnMatch, ctx: RewriteContext) -> ir.Value:
        source = m.kt.inputs[0]
        if m.kt_perm == (0, 1, 3, 2):
            return source
        t = ctx.node(
            "Transpose", [source], attributes=attrs(perm=list(_BNSH_FROM_BSNH)), before=m.pv,
            name_hint=scoped(m.pv, "key_bnsh"),
        )
        return t.outputs[0]

    @staticmethod
    def _dim(value: ir.Value, axis: int, ctx: RewriteContext, before: ir.Node, hint: str) -> ir.Value:
        """A 1-element int64 tensor holding dim ``axis`` of ``value``."""
        if ctx.opset >= 15:
            node = ctx.node("Shape", [value], attributes=attrs(start=axis, end=axis + 1), before=before, name_hint=hint)
            return node.outputs[0]
        shape = ctx.node("Shape", [value], before=before, name_hint=hint)
        index = ctx.constant(np.array([axis], dtype=np.int64), f"{hint}_index", before=before)
        return ctx.node("Gather", [shape.outputs[0], index], attributes=attrs(axis=0), before=before, name_hint=hint).outputs[0]

    def _expanded_mask(
        self, m: AttnMatch, ctx: RewriteContext, q: ir.Value, q_axis: int, k: ir.Value, k_axis: int
    ) -> ir.Value | None:
        """The mask broadcast to (.., S, T): Expand(mask, [1, 1, S, T]), unless it
        is 4-D with last dims known to be S and T already."""
        if m.mask is None:
            return None
        mask_dims, q_dims, v_dims = known_dims(m.mask), known_dims(m.q), known_dims(m.v)
        if (
            mask_dims is not None and len(mask_dims) == 4 and q_dims is not None and v_dims is not None
            and len(q_dims) == 4 and len(v_dims) == 4
            and isinstance(q_dims[2], int) and isinstance(v_dims[2], int)
            and mask_dims[2:] == (q_dims[2], v_dims[2])
        ):
            return m.mask
        scope = scoped(m.pv, "mask")
        s = self._dim(q, q_axis, ctx, m.pv, f"{scope}_q_len")
        t = self._dim(k, k_axis, ctx, m.pv, f"{scope}_kv_len")
        ones = ctx.constant(np.array([1, 1], dtype=np.int64), f"{scope}_ones", before=m.pv)
        shape = ctx.node("Concat", [ones, s, t], attributes=attrs(axis=0), before=m.pv, name_hint=f"{scope}_shape")
        return ctx.node("Expand", [m.mask, shape.outputs[0]], before=m.pv, name_hint=f"{scope}_expand").outputs[0]

    # ------------------------------------------------------------ standard Attention (opset 23)

    def _rewrite_standard(self, m: AttnMatch, ctx: RewriteContext) -> None:
        key = self._key_bnsh(m, ctx)
        mask = self._expanded_mask(m, ctx, m.q, 2, key, 2)
        inputs = [m.q, key, m.v] + ([mask] if mask is not None else [])
        node = ctx.node(
            "Attention", inputs, attributes=attrs(scale=float(m.scale)), before=m.pv,
            name_hint=scoped(m.pv, "Attention"),
        )
        replace(ctx, m.nodes, [m.pv.outputs[0]], [node.outputs[0]])

    # ------------------------------------------------------------ com.microsoft MultiHeadAttention

    def _rewrite_mha(self, m: AttnMatch, ctx: RewriteContext) -> None:
        assert m.heads is not None
        num_heads, _ = m.heads
        scope = scoped(m.pv, "MultiHeadAttention")
        merge = ctx.constant(np.array([0, 0, -1], dtype=np.int64), f"{scope}_merge_heads", before=m.pv)
        removed = list(m.nodes)

        def to_bsd(value: ir.Value, consumer: ir.Node, hint: str) -> ir.Value:
            """(B, N, S, H) -> (B, S, N*H); a Transpose (0, 2, 1, 3) feeding only ``consumer`` is undone."""
            source = producer(value, "Transpose")
            if source is not None and _perm(source) == _BNSH_FROM_BSNH and sole_user(value) is consumer:
                bsnh = source.inputs[0]
                removed.insert(0, source)
            else:
                bsnh = ctx.node(
                    "Transpose", [value], attributes=attrs(perm=list(_BNSH_FROM_BSNH)), before=m.pv,
                    name_hint=f"{scope}_{hint}_bsnh",
                ).outputs[0]
            return ctx.node("Reshape", [bsnh, merge], before=m.pv, name_hint=f"{scope}_{hint}").outputs[0]

        query = to_bsd(m.q, m.qk, "query")
        # Key and value: both 3-D when both come from a head split, else both BNSH.
        k_src, v_src = m.kt.inputs[0], m.v
        v_split = producer(v_src, "Transpose")
        k_is_split = m.kt_perm == (0, 2, 3, 1) and m.kt in m.nodes
        v_is_split = v_split is not None and _perm(v_split) == _BNSH_FROM_BSNH and sole_user(v_src) is m.pv
        if k_is_split and v_is_split:
            key = ctx.node("Reshape", [k_src, merge], before=m.pv, name_hint=f"{scope}_key").outputs[0]
            value = to_bsd(v_src, m.pv, "value")
            kv_axis = 1
        else:
            key = self._key_bnsh(m, ctx)
            value = v_src
            kv_axis = 2
        mask = self._expanded_mask(m, ctx, query, 1, key, kv_axis)
        inputs = [query, key, value, None, None, mask] if mask is not None else [query, key, value]
        mha = ctx.node(
            "MultiHeadAttention", inputs, attributes=attrs(num_heads=num_heads, scale=float(m.scale)),
            before=m.pv, name_hint=scope, domain=MS_DOMAIN,
        )
        ctx.ensure_opset(MS_DOMAIN, 1)
        out = mha.outputs[0]
        split = ctx.constant(np.array([0, 0, num_heads, -1], dtype=np.int64), f"{scope}_split_heads", before=m.pv)
        after = sole_user(m.pv.outputs[0])
        if after is not None and after.op_type == "Transpose" and _perm(after) == _BNSH_FROM_BSNH:
            # The usual (B, N, S, H) -> (B, S, N, H) after the attention: MHA's output is that already.
            bsnh = ctx.node("Reshape", [out, split], before=m.pv, name_hint=f"{scope}_bsnh").outputs[0]
            replace(ctx, [*removed, after], [after.outputs[0]], [bsnh])
            _skip_split_reshape(bsnh, out, ctx)
        else:
            bsnh = ctx.node("Reshape", [out, split], before=m.pv, name_hint=f"{scope}_bsnh").outputs[0]
            bnsh = ctx.node(
                "Transpose", [bsnh], attributes=attrs(perm=list(_BNSH_FROM_BSNH)), before=m.pv,
                name_hint=f"{scope}_bnsh",
            ).outputs[0]
            replace(ctx, removed, [m.pv.outputs[0]], [bnsh])


def _skip_split_reshape(bsnh: ir.Value, bsd: ir.Value, ctx: RewriteContext) -> None:
    """Reshape(Reshape(bsd, [0, 0, N, -1]), s) reads ``bsd`` directly when the
    entries of ``s`` from index 2 on are constants other than 0 (the leading two
    dims of ``bsnh`` and ``bsd`` are the same, and so is the data order)."""
    for user, index in list(bsnh.uses()):
        if user.op_type != "Reshape" or index != 0 or len(user.inputs) < 2:
            continue
        if attr_int(user, "allowzero", 0) != 0:
            continue
        entries = shape_entries(user.inputs[1])
        if entries is None or len(entries) < 3:
            continue
        if all(isinstance(e, int) and e != 0 for e in entries[2:]):
            user.replace_input_with(0, bsd)
    split = bsnh.producer()
    if split is not None and not bsnh.uses() and not bsnh.is_graph_output():
        ctx.kill(split)



@register
@dataclasses.dataclass(frozen=True)
class FuseAttention(RulePass):
    """Fuse scaled dot-product attention (MatMul, scale, mask, Softmax, MatMul) into one op."""

    name: ClassVar[str] = "fuse-attention"
    summary: ClassVar[str] = (
        "MatMul(Q,K^T)[*scale][+mask] -> Softmax -> MatMul(V) -> Attention (opset 23) or "
        "com.microsoft MultiHeadAttention (contrib and gpu)"
    )

    contrib: bool = False
    #: The target runs onnxruntime with a GPU execution provider: use the contrib
    #: form that is fast there (it measured no faster on the CPU).
    gpu: bool = False

    def rules(self) -> list[Rule]:
        return [AttentionRule(self.contrib, self.gpu)]
