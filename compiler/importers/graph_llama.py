"""The LLaMA-family graph (LLaMA, Mistral, Qwen2, SmolLM) from a checkpoint: pre-norm RMSNorm blocks,
rotary embeddings, grouped-query attention, SwiGLU MLP, tied or separate LM head.

The checkpoint holds LLaMA's Q/K rows in llama.cpp's interleaved-pair layout (``hf_arch._permute``,
and GGUF files store them so too); the graph undoes that permutation when a weight is read, so rotary
embeddings take the rotate-half form Hugging Face computes (and kiln's fusions and pruning know).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from compiler.errors import UnsupportedError
from compiler.importers.checkpoint import Checkpoint
from compiler.importers.graph_ops import GraphBuilder


def _unpermute(n_head: int):
    """llama.cpp's interleaved q/k rows -> Hugging Face's rotate-half rows (inverse of hf_arch._permute)."""
    def apply(w: np.ndarray) -> np.ndarray:
        return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return apply


def inv_freq(ck: Checkpoint, head_dim: int) -> np.ndarray:
    """Rotary inverse frequencies as Hugging Face computes them (float32), with linear / llama3 scaling."""
    theta = np.float32(ck.get("{arch}.rope.freq_base", 10000.0))
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (np.float32(1.0) / theta ** exponent).astype(np.float32)
    kind = ck.get("{arch}.rope.scaling.type")
    if kind == "linear":
        inv = (inv / np.float32(ck.get("{arch}.rope.scaling.factor"))).astype(np.float32)
    elif kind not in (None, "none"):
        raise UnsupportedError(f"{ck.path}: rope scaling {kind!r} has no graph form in kiln yet",
                               hint="default, linear and llama3 rope are supported; --emit gguf takes this checkpoint")
    factors = ck.tensor("rope_freqs.weight")  # llama3-style scaling: per-frequency divisors
    if factors is not None:
        inv = (inv / factors.load()).astype(np.float32)
    return inv


def sliding_windows(config: dict[str, Any], n_layer: int) -> list[int | None]:
    """Per layer the sliding attention window Hugging Face applies, or None for full attention."""
    window = config.get("sliding_window")
    types = config.get("layer_types")
    if window is None:
        return [None] * n_layer
    if types:
        return [window if t == "sliding_attention" else None for t in types[:n_layer]]
    if "MistralForCausalLM" in (config.get("architectures") or []):
        return [window] * n_layer
    if config.get("use_sliding_window"):
        return [window] * n_layer
    return [None] * n_layer


def build(ck: Checkpoint, config: dict[str, Any], opset: int) -> tuple[ir.Model, dict[str, Any]]:
    n_layer = int(ck.get("{arch}.block_count"))
    n_head = int(ck.get("{arch}.attention.head_count"))
    n_kv = int(ck.get("{arch}.attention.head_count_kv", n_head))
    n_embd = int(ck.get("{arch}.embedding_length"))
    head_dim = int(ck.get("{arch}.attention.key_length", n_embd // n_head))
    n_rot = int(ck.get("{arch}.rope.dimension_count", head_dim))
    eps = float(ck.get("{arch}.attention.layer_norm_rms_epsilon", 1e-5))
    if n_rot != head_dim:
        raise UnsupportedError(f"{ck.path}: partial rotary embeddings ({n_rot} of {head_dim} dims) have no graph form yet")
    if n_head % n_kv:
        raise UnsupportedError(f"{ck.path}: {n_head} query heads do not share {n_kv} key/value heads evenly")
    vocab = ck.tensor("token_embd.weight").shape[0]
    permuted = ck.arch == "llama"  # llama.cpp permutes LLaMA's q/k rows (not Qwen2's)
    q_layout = _unpermute(n_head) if permuted else None
    k_layout = _unpermute(n_kv) if permuted else None

    g = GraphBuilder(ck, opset)
    ids = g.input("input_ids", ir.DataType.INT64, ["batch", "sequence"])
    attn_mask = g.input("attention_mask", ir.DataType.INT64, ["batch", "sequence"])
    embd = g.weight("token_embd.weight", "embed_tokens.weight")
    h = g.op("Gather", embd, ids, name="embed_tokens", axis=0)

    _, pos = g.positions(ids)
    angles = g.op("Mul", g.op("Unsqueeze", g.op("Cast", pos, name="rope.pos", to=ir.DataType.FLOAT),
                              g.ints([1], "rope.axis"), name="rope.pos_col"),
                  g.const(inv_freq(ck, head_dim), "rope.inv_freq"), name="rope.freqs")
    angles = g.op("Concat", angles, angles, name="rope.angles", axis=-1)
    cos = g.op("Cos", angles, name="rope.cos")
    sin = g.op("Sin", angles, name="rope.sin")

    windows = sliding_windows(config, n_layer)
    masks = {w: g.additive_mask(pos, attn_mask, causal=True, window=w, name=f"mask{'' if w is None else f'.w{w}'}")
             for w in sorted(set(windows), key=lambda w: -1 if w is None else w)}

    def rope(x: ir.Value, name: str) -> ir.Value:
        lo, hi = g.op("Split", x, name=f"{name}.halves", outputs=2, axis=-1, num_outputs=2)
        rotated = g.op("Concat", g.op("Neg", hi, name=f"{name}.neg"), lo, name=f"{name}.rotate_half", axis=-1)
        return g.op("Add", g.op("Mul", x, cos, name=f"{name}.cos"), g.op("Mul", rotated, sin, name=f"{name}.sin"),
                    name=name)

    for i in range(n_layer):
        p, n = f"blk.{i}", f"layers.{i}"
        x = g.rms_norm(h, f"{p}.attn_norm.weight", eps, f"{n}.input_layernorm")
        q = g.linear(x, f"{p}.attn_q", f"{n}.q_proj", q_layout, q_layout)
        k = g.linear(x, f"{p}.attn_k", f"{n}.k_proj", k_layout, k_layout)
        v = g.linear(x, f"{p}.attn_v", f"{n}.v_proj")
        q = rope(g.split_heads(q, n_head, head_dim, f"{n}.q_heads"), f"{n}.q_rope")
        k = rope(g.split_heads(k, n_kv, head_dim, f"{n}.k_heads"), f"{n}.k_rope")
        v = g.split_heads(v, n_kv, head_dim, f"{n}.v_heads")
        k = g.repeat_kv(k, n_head // n_kv, n_head, head_dim, f"{n}.k_repeat")
        v = g.repeat_kv(v, n_head // n_kv, n_head, head_dim, f"{n}.v_repeat")
        a = g.attention(q, k, v, masks[windows[i]], head_dim, f"{n}.attn")
        a = g.linear(g.merge_heads(a, n_head * head_dim, f"{n}.attn_merge"), f"{p}.attn_output", f"{n}.o_proj")
        h = g.op("Add", h, a, name=f"{n}.attn_residual")
        x = g.rms_norm(h, f"{p}.ffn_norm.weight", eps, f"{n}.post_attention_layernorm")
        gate = g.linear(x, f"{p}.ffn_gate", f"{n}.gate_proj")
        up = g.linear(x, f"{p}.ffn_up", f"{n}.up_proj")
        act = g.op("Mul", gate, g.op("Sigmoid", gate, name=f"{n}.sigmoid"), name=f"{n}.silu")
        down = g.linear(g.op("Mul", act, up, name=f"{n}.gated"), f"{p}.ffn_down", f"{n}.down_proj")
        h = g.op("Add", h, down, name=f"{n}.mlp_residual")
    h = g.rms_norm(h, "output_norm.weight", eps, "norm")
    logits = lm_head(g, h, ids, embd, vocab, n_embd)
    rope_kind = ck.get("{arch}.rope.scaling.type") or ("llama3" if ck.tensor("rope_freqs.weight") else None)
    hparams = {"num_hidden_layers": n_layer, "num_attention_heads": n_head, "num_key_value_heads": n_kv,
               "hidden_size": n_embd, "head_dim": head_dim,
               "intermediate_size": int(ck.get("{arch}.feed_forward_length", 0)), "vocab_size": vocab,
               "rms_norm_eps": eps, "rope_theta": float(ck.get("{arch}.rope.freq_base", 10000.0)),
               "rope_scaling": ({"type": rope_kind, "factor": ck.get("{arch}.rope.scaling.factor")}
                                if rope_kind else None),
               "sliding_window": next((w for w in windows if w is not None), None),
               "tie_word_embeddings": not g.has("output.weight")}
    return g.model([logits], [["batch", "sequence", vocab]]), hparams


def lm_head(g: GraphBuilder, h: ir.Value, ids: ir.Value, embd: ir.Value, vocab: int, n_embd: int) -> ir.Value:
    """``output.weight`` as a MatMul, or with tied embeddings a Gemm that reads the embedding table itself
    (transB), so one table serves both and quantizes once."""
    if g.has("output.weight"):
        w = g.linear_weight("output.weight", "lm_head.weight")
        return g.op("MatMul", h, w, name="logits")
    flat = g.op("Reshape", h, g.ints([-1, n_embd], "lm_head.flat_shape"), name="lm_head.flatten")
    out = g.op("Gemm", flat, embd, name="lm_head.tied", transB=1)
    shape = g.op("Concat", g.op("Shape", ids, name="lm_head.batch_seq"), g.ints([vocab], "lm_head.vocab"),
                 name="lm_head.shape", axis=0)
    return g.op("Reshape", out, shape, name="logits")
