"""The BERT-style encoder graph from a checkpoint: word + position + token-type embeddings, post-norm
blocks, bidirectional attention over the unpadded keys; output ``last_hidden_state`` (no pooler)."""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from compiler.errors import UnsupportedError
from compiler.importers.checkpoint import Checkpoint
from compiler.importers.graph_gpt2 import gelu, gelu_form
from compiler.importers.graph_ops import GraphBuilder


def build(ck: Checkpoint, config: dict[str, Any], opset: int) -> tuple[ir.Model, dict[str, Any]]:
    n_layer = int(ck.get("bert.block_count"))
    n_head = int(ck.get("bert.attention.head_count"))
    n_embd = int(ck.get("bert.embedding_length"))
    eps = float(ck.get("bert.attention.layer_norm_epsilon", 1e-12))
    head_dim = n_embd // n_head
    form = gelu_form(config, "hidden_act", "gelu", ck.path)
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedError(f"{ck.path}: BERT position embeddings {config['position_embedding_type']!r} "
                               "have no graph form in kiln yet (absolute is supported)")

    g = GraphBuilder(ck, opset)
    ids = g.input("input_ids", ir.DataType.INT64, ["batch", "sequence"])
    attn_mask = g.input("attention_mask", ir.DataType.INT64, ["batch", "sequence"])
    _, pos = g.positions(ids)
    h = g.op("Add", g.op("Gather", g.weight("token_embd.weight", "word_embeddings.weight"), ids,
                         name="word_embeddings", axis=0),
             g.op("Gather", g.weight("position_embd.weight", "position_embeddings.weight"), pos,
                  name="position_embeddings", axis=0), name="embeddings.sum")
    if g.has("token_types.weight"):  # every token is of type 0 (the graph takes no token_type_ids)
        row = g.weight("token_types.weight", "token_type_embeddings.row0", lambda w: w[0], (n_embd,))
        h = g.op("Add", h, row, name="embeddings.token_type")
    h = g.layer_norm(h, "token_embd_norm", eps, "embeddings.LayerNorm")
    mask = g.additive_mask(pos, attn_mask, causal=False)
    for i in range(n_layer):
        p, n = f"blk.{i}", f"layer.{i}"
        q = g.split_heads(g.linear(h, f"{p}.attn_q", f"{n}.query"), n_head, head_dim, f"{n}.q_heads")
        k = g.split_heads(g.linear(h, f"{p}.attn_k", f"{n}.key"), n_head, head_dim, f"{n}.k_heads")
        v = g.split_heads(g.linear(h, f"{p}.attn_v", f"{n}.value"), n_head, head_dim, f"{n}.v_heads")
        a = g.attention(q, k, v, mask, head_dim, f"{n}.attn")
        a = g.linear(g.merge_heads(a, n_embd, f"{n}.attn_merge"), f"{p}.attn_output", f"{n}.attention.output")
        h = g.layer_norm(g.op("Add", a, h, name=f"{n}.attn_residual"), f"{p}.attn_output_norm", eps,
                         f"{n}.attention.LayerNorm")
        up = gelu(g, g.linear(h, f"{p}.ffn_up", f"{n}.intermediate"), form, f"{n}.gelu")
        down = g.linear(up, f"{p}.ffn_down", f"{n}.output")
        h = g.layer_norm(g.op("Add", down, h, name=f"{n}.mlp_residual"), f"{p}.layer_output_norm", eps,
                         f"{n}.output.LayerNorm")
    out = g.rename(h, "last_hidden_state")
    hparams = {"num_hidden_layers": n_layer, "num_attention_heads": n_head, "hidden_size": n_embd,
               "intermediate_size": int(ck.get("bert.feed_forward_length", 0)),
               "vocab_size": ck.tensor("token_embd.weight").shape[0],
               "max_position_embeddings": ck.tensor("position_embd.weight").shape[0], "layer_norm_eps": eps,
               "gelu": form}
    return g.model([out], [["batch", "sequence", n_embd]]), hparams
