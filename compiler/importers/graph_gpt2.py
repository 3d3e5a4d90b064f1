"""The GPT-2 graph from a checkpoint: learned positions, pre-norm LayerNorm blocks, fused QKV projection,
GELU MLP, LM head tied to the token embedding (unless the checkpoint has its own)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from compiler.errors import UnsupportedError
from compiler.importers.checkpoint import Checkpoint
from compiler.importers.graph_llama import lm_head
from compiler.importers.graph_ops import GraphBuilder

#: Hugging Face activation names -> the GELU form that computes them
GELU_FORMS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "erf"}


def gelu(g: GraphBuilder, x: ir.Value, form: str, name: str) -> ir.Value:
    """0.5 x (1 + erf(x / sqrt 2)) or 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), decomposed (fuse-gelu fuses it)."""
    if form == "erf":
        inner = g.op("Erf", g.op("Div", x, g.const(np.sqrt(2.0), f"{name}.sqrt2"), name=f"{name}.scaled"),
                     name=f"{name}.erf")
    else:
        cube = g.op("Pow", x, g.const(3.0, f"{name}.three"), name=f"{name}.cube")
        poly = g.op("Add", x, g.op("Mul", cube, g.const(0.044715, f"{name}.c"), name=f"{name}.cubic"),
                    name=f"{name}.poly")
        inner = g.op("Tanh", g.op("Mul", poly, g.const(np.sqrt(2.0 / np.pi), f"{name}.k"), name=f"{name}.arg"),
                     name=f"{name}.tanh")
    one_plus = g.op("Add", inner, g.const(1.0, f"{name}.one"), name=f"{name}.one_plus")
    half = g.op("Mul", x, g.const(0.5, f"{name}.half"), name=f"{name}.half_x")
    return g.op("Mul", half, one_plus, name=name)


def gelu_form(config: dict[str, Any], key: str, default: str, where: Any) -> str:
    act = config.get(key, default)
    if act not in GELU_FORMS:
        raise UnsupportedError(f"{where}: activation {act!r} has no graph form in kiln yet",
                               hint=f"supported: {', '.join(GELU_FORMS)}")
    return GELU_FORMS[act]


def build(ck: Checkpoint, config: dict[str, Any], opset: int) -> tuple[ir.Model, dict[str, Any]]:
    n_layer = int(ck.get("gpt2.block_count"))
    n_head = int(ck.get("gpt2.attention.head_count"))
    n_embd = int(ck.get("gpt2.embedding_length"))
    eps = float(ck.get("gpt2.attention.layer_norm_epsilon", 1e-5))
    head_dim = n_embd // n_head
    form = gelu_form(config, "activation_function", "gelu_new", ck.path)
    for flag, expected in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                           ("reorder_and_upcast_attn", False)):
        if config.get(flag, expected) != expected:
            raise UnsupportedError(f"{ck.path}: GPT-2 with {flag}={config[flag]} has no graph form in kiln yet")
    vocab = ck.tensor("token_embd.weight").shape[0]

    g = GraphBuilder(ck, opset)
    ids = g.input("input_ids", ir.DataType.INT64, ["batch", "sequence"])
    attn_mask = g.input("attention_mask", ir.DataType.INT64, ["batch", "sequence"])
    embd = g.weight("token_embd.weight", "wte.weight")
    _, pos = g.positions(ids)
    h = g.op("Add", g.op("Gather", embd, ids, name="wte", axis=0),
             g.op("Gather", g.weight("position_embd.weight", "wpe.weight"), pos, name="wpe", axis=0), name="embed")
    mask = g.additive_mask(pos, attn_mask, causal=True)
    split = g.ints([n_embd] * 3, "qkv.split")
    for i in range(n_layer):
        p, n = f"blk.{i}", f"h.{i}"
        x = g.layer_norm(h, f"{p}.attn_norm", eps, f"{n}.ln_1")
        q, k, v = g.op("Split", g.linear(x, f"{p}.attn_qkv", f"{n}.c_attn"), split, name=f"{n}.qkv", outputs=3,
                       axis=-1)
        q, k, v = (g.split_heads(t, n_head, head_dim, f"{n}.{w}_heads") for t, w in ((q, "q"), (k, "k"), (v, "v")))
        a = g.attention(q, k, v, mask, head_dim, f"{n}.attn")
        a = g.linear(g.merge_heads(a, n_embd, f"{n}.attn_merge"), f"{p}.attn_output", f"{n}.c_proj")
        h = g.op("Add", h, a, name=f"{n}.attn_residual")
        x = g.layer_norm(h, f"{p}.ffn_norm", eps, f"{n}.ln_2")
        up = gelu(g, g.linear(x, f"{p}.ffn_up", f"{n}.c_fc"), form, f"{n}.gelu")
        h = g.op("Add", h, g.linear(up, f"{p}.ffn_down", f"{n}.mlp_proj"), name=f"{n}.mlp_residual")
    h = g.layer_norm(h, "output_norm", eps, "ln_f")
    logits = lm_head(g, h, ids, embd, vocab, n_embd)
    hparams = {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd,
               "n_inner": int(ck.get("gpt2.feed_forward_length", 4 * n_embd)), "vocab_size": vocab,
               "n_positions": ck.tensor("position_embd.weight").shape[0], "layer_norm_epsilon": eps,
               "gelu": form, "tie_word_embeddings": not g.has("output.weight")}
    return g.model([logits], [["batch", "sequence", vocab]]), hparams
