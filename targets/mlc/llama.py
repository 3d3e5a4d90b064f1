"""The LLaMA family (llama, mistral, qwen2) as a TVM ``relax.frontend.nn`` module with a KV cache.

Hugging Face's layout, MLC-LLM's parameter names: ``model.embed_tokens``,
``model.layers.N.self_attn.qkv_proj`` (q, k, v rows stacked),
``...self_attn.o_proj``, ``...mlp.gate_up_proj`` (gate rows, then up rows),
``...mlp.down_proj``, ``...input_layernorm``, ``...post_attention_layernorm``,
``model.norm``, ``lm_head`` (absent when tied to the embedding). Quantized
modes replace a linear or embedding ``weight`` by ``q_weight`` + ``q_scale``.

One forward serves both exported functions: ``prefill`` (``input_ids`` [1, n])
and ``decode`` ([1, 1]); each also takes ``total_seq_len`` (tokens in the cache
after this call), appends its keys and values to one ``nn.KVCache`` per layer
and returns float32 logits for every new position. Rotary embeddings use the
rotate-half form with HF's float32 inverse frequencies; attention scores,
softmax and RMSNorm statistics are computed in float32 in every mode.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import numpy as np

from targets.mlc import group_quant, kernels
from targets.mlc.modes import Mode


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    context_window_size: int
    attention_bias: bool
    tie_word_embeddings: bool
    #: HF's inverse rotary frequencies (float32, scaling already applied), [head_dim / 2]
    inv_freq: tuple[float, ...]
    #: linear rope scaling: positions are divided by this
    position_scale: float = 1.0

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["inv_freq"] = list(self.inv_freq)
        return out


def build(config: LlamaConfig, mode: Mode) -> Any:
    """The ``nn.Module`` and the export spec of its ``prefill`` / ``decode`` functions."""
    from tvm import tirx
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn import op

    dtype = mode.model_dtype

    def to32(x: Any) -> Any:
        return x if x.dtype == "float32" else op.astype(x, "float32")

    def to_model(x: Any) -> Any:
        return x if x.dtype == dtype else op.astype(x, dtype)

    def linear(x: Any, weights: list, n: int, k: int) -> Any:
        """x [1, m, k] @ W[n, k]^T -> [1, m, n] float32, by the hand-scheduled kernel (``kernels``)."""
        m = x.shape[1]
        rows = to32(op.reshape(x, [m, k]))
        quant = mode if mode.quantized else None
        decoding = isinstance(m, int) or getattr(m, "value", None) == 1
        func = kernels.linear(n, k, "float32", quant, weight_dtype=None if quant else dtype,
                              rows_at_once=1 if decoding else kernels.PREFILL_ROWS)
        out = op.tensor_ir_op(func, "mlc_linear", [rows, *weights], nn.Tensor.placeholder([m, n], "float32"))
        return op.reshape(out, [1, m, n])

    class Linear(nn.Module):
        def __init__(self, k: int, n: int, bias: bool) -> None:
            self.k, self.n = k, n
            if mode.quantized:
                g = group_quant.groups(k, mode)
                self.q_weight = nn.Parameter((n, g * mode.group_size // mode.per_storage), mode.storage_dtype)
                self.q_scale = nn.Parameter((n, g), dtype)
            else:
                self.weight = nn.Parameter((n, k), dtype)
            self.bias = nn.Parameter((n,), dtype) if bias else None

        def forward(self, x: Any) -> Any:
            weights = [self.q_weight, self.q_scale] if mode.quantized else [self.weight]
            y = to_model(linear(x, weights, self.n, self.k))
            return y + self.bias if self.bias is not None else y

    class Embedding(nn.Module):
        def __init__(self, vocab: int, dim: int) -> None:
            self.vocab, self.dim = vocab, dim
            if mode.quantized:
                g = group_quant.groups(dim, mode)
                self.q_weight = nn.Parameter((vocab, g * mode.group_size // mode.per_storage), mode.storage_dtype)
                self.q_scale = nn.Parameter((vocab, g), dtype)
            else:
                self.weight = nn.Parameter((vocab, dim), dtype)

        def forward(self, ids: Any) -> Any:
            if mode.quantized:
                return op.tensor_expr_op(partial(group_quant.qtake, dim=self.dim, mode=mode), "q4_take",
                                         [self.q_weight, self.q_scale, ids])
            return op.take(self.weight, ids, axis=0)

        def lm_head(self, x: Any) -> Any:  # tied output projection, float32 logits
            weights = [self.q_weight, self.q_scale] if mode.quantized else [self.weight]
            return linear(x, weights, self.vocab, self.dim)

    class RMSNorm(nn.Module):
        def __init__(self, dim: int) -> None:
            self.weight = nn.Parameter((dim,), dtype)

        def forward(self, x: Any) -> Any:
            x32 = to32(x)
            var = op.sum(x32 * x32, axis=-1, keepdims=True) / float(x.shape[-1])
            return to_model(x32 / op.sqrt(var + config.rms_norm_eps) * to32(self.weight))

    def rotary(x: Any, offset: Any) -> Any:
        """Rotate-half rotary embedding of x [1, n, heads, head_dim] at positions offset..offset+n."""
        inv = [float(f) for f in np.asarray(config.inv_freq, np.float32)]
        half = config.head_dim // 2

        def te_rope(x: Any, offset: Any) -> Any:
            from tvm import te

            def body(b: Any, i: Any, h: Any, d: Any) -> Any:
                j = tirx.if_then_else(d < half, d, d - half)
                freq = tirx.const(0.0, "float32")
                for idx in range(half - 1, -1, -1):  # a select chain: inv_freq as constants
                    freq = tirx.Select(j == idx, tirx.const(inv[idx], "float32"), freq)
                pos = (offset + i).astype("float32")
                if config.position_scale != 1.0:
                    pos = pos / tirx.const(config.position_scale, "float32")
                angle = pos * freq
                cos, sin = tirx.cos(angle), tirx.sin(angle)
                xv = x[b, i, h, d].astype("float32")
                partner = tirx.if_then_else(d < half, -x[b, i, h, d + half].astype("float32"),
                                            x[b, i, h, d - half].astype("float32"))
                return (xv * cos + partner * sin).astype(x.dtype)

            return te.compute(x.shape, body, name="rotary")

        return op.tensor_expr_op(te_rope, "rotary", [x, offset])

    def causal_scores(scores: Any, offset: Any) -> Any:
        """[kv_heads, group, n, total] float32: scaled, and the lowest float where key j > query position."""
        scale = config.head_dim ** -0.5

        def te_mask(s: Any, offset: Any) -> Any:
            from tvm import te

            def body(h: Any, g: Any, i: Any, j: Any) -> Any:
                return tirx.if_then_else(j <= offset + i, s[h, g, i, j] * tirx.const(scale, "float32"),
                                         tirx.min_value("float32"))

            return te.compute(s.shape, body, name="causal_mask")

        return op.tensor_expr_op(te_mask, "causal_mask", [scores, offset])

    class Attention(nn.Module):
        def __init__(self) -> None:
            c = config
            self.n_q, self.n_kv = c.num_attention_heads, c.num_key_value_heads
            self.qkv_proj = Linear(c.hidden_size, (self.n_q + 2 * self.n_kv) * c.head_dim, c.attention_bias)
            self.o_proj = Linear(self.n_q * c.head_dim, c.hidden_size, False)
            self.k_cache = nn.KVCache(min(c.context_window_size, 1024), [self.n_kv, c.head_dim], dtype)
            self.v_cache = nn.KVCache(min(c.context_window_size, 1024), [self.n_kv, c.head_dim], dtype)

        def forward(self, x: Any, total: Any, offset: Any) -> Any:
            hd, n_q, n_kv = config.head_dim, self.n_q, self.n_kv
            group = n_q // n_kv
            n = x.shape[1]
            qkv = op.reshape(self.qkv_proj(x), [1, n, n_q + 2 * n_kv, hd])
            q, k, v = op.split(qkv, [n_q, n_q + n_kv], axis=2)
            q, k = rotary(q, offset), rotary(k, offset)
            self.k_cache.append(op.reshape(k, [n, n_kv, hd]))
            self.v_cache.append(op.reshape(v, [n, n_kv, hd]))
            keys = to32(self.k_cache.view(total))  # [total, n_kv, hd]
            values = to32(self.v_cache.view(total))
            # query head h reads kv head h // group (HF's repeat_kv)
            qg = op.permute_dims(op.reshape(to32(q), [n, n_kv, group, hd]), [1, 2, 0, 3])  # [n_kv, group, n, hd]
            kt = op.unsqueeze(op.permute_dims(keys, [1, 2, 0]), 1)  # [n_kv, 1, hd, total]
            probs = op.softmax(causal_scores(op.matmul(qg, kt), offset), axis=-1)  # [n_kv, group, n, total]
            out = op.matmul(probs, op.unsqueeze(op.permute_dims(values, [1, 0, 2]), 1))  # [n_kv, group, n, hd]
            out = op.reshape(op.permute_dims(out, [2, 0, 1, 3]), [1, n, n_q * hd])
            return self.o_proj(to_model(out))

    class MLP(nn.Module):
        def __init__(self) -> None:
            self.inter = config.intermediate_size
            self.gate_up_proj = Linear(config.hidden_size, 2 * self.inter, False)
            self.down_proj = Linear(self.inter, config.hidden_size, False)

        def forward(self, x: Any) -> Any:
            gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)
            return self.down_proj(op.silu(gate) * up)

    class Layer(nn.Module):
        def __init__(self) -> None:
            self.input_layernorm = RMSNorm(config.hidden_size)
            self.self_attn = Attention()
            self.post_attention_layernorm = RMSNorm(config.hidden_size)
            self.mlp = MLP()

        def forward(self, h: Any, total: Any, offset: Any) -> Any:
            h = h + self.self_attn(self.input_layernorm(h), total, offset)
            return h + self.mlp(self.post_attention_layernorm(h))

    class Model(nn.Module):
        def __init__(self) -> None:
            self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
            self.layers = nn.ModuleList([Layer() for _ in range(config.num_hidden_layers)])
            self.norm = RMSNorm(config.hidden_size)

    class LlamaForCausalLM(nn.Module):
        def __init__(self) -> None:
            self.model = Model()
            self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size, False)

        def forward(self, input_ids: Any, total_seq_len: Any) -> Any:
            n = input_ids.shape[1]
            offset = total_seq_len - n  # position of the first new token
            h = self.model.embed_tokens(input_ids)
            for layer in self.model.layers:
                h = layer(h, total_seq_len, offset)
            h = self.model.norm(h)
            if self.lm_head is None:
                return self.model.embed_tokens.lm_head(h)
            weights = [self.lm_head.q_weight, self.lm_head.q_scale] if mode.quantized else [self.lm_head.weight]
            return linear(h, weights, config.vocab_size, config.hidden_size)  # float32 logits

        def prefill(self, input_ids: Any, total_seq_len: Any) -> Any:
            return self.forward(input_ids, total_seq_len)

        def decode(self, input_ids: Any, total_seq_len: Any) -> Any:
            return self.forward(input_ids, total_seq_len)

    spec = {
        "prefill": {"input_ids": nn.spec.Tensor([1, "seq_len"], "int32"), "total_seq_len": nn.spec.Int()},
        "decode": {"input_ids": nn.spec.Tensor([1, 1], "int32"), "total_seq_len": nn.spec.Int()},
    }
    return LlamaForCausalLM(), spec
