"""Per-architecture facts for Hugging Face checkpoints: which llama.cpp architecture a
``config.json`` is, its hyper-parameters as GGUF metadata, and how each tensor name maps
(and what layout change it needs) to llama.cpp's tensor names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from compiler.errors import ModelFormatError, UnsupportedError
from targets.gguf.format import Value, boolean, f32, string, u32

#: Hugging Face architecture -> GGUF architecture
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "GPT2LMHeadModel": "gpt2",
    "BertModel": "bert",
}
SUPPORTED_HINT = ("supported: " + ", ".join(ARCHITECTURES)
                  + " (SmolLM checkpoints are LlamaForCausalLM)")

Transform = Callable[[np.ndarray], np.ndarray]


def gguf_arch(config: dict[str, Any], where: str) -> str:
    names = config.get("architectures") or []
    if not names:
        raise UnsupportedError(f"{where}: config.json names no architecture", hint=SUPPORTED_HINT)
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise UnsupportedError(f"{where}: architecture {names[0]} is not supported", hint=SUPPORTED_HINT)


def _need(config: dict[str, Any], *keys: str, where: str) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    raise ModelFormatError(f"{where}: config.json lacks {keys[0]}")


def hparams(arch: str, config: dict[str, Any], where: str) -> dict[str, Value]:
    """The ``{arch}.*`` GGUF entries for this config."""
    if arch in ("llama", "qwen2"):
        return _llama_hparams(arch, config, where)
    if arch == "gpt2":
        n_embd = _need(config, "n_embd", "hidden_size", where=where)
        return {
            "gpt2.context_length": u32(_need(config, "n_positions", "n_ctx", where=where)),
            "gpt2.embedding_length": u32(n_embd),
            "gpt2.feed_forward_length": u32(config.get("n_inner") or 4 * n_embd),
            "gpt2.block_count": u32(_need(config, "n_layer", "num_hidden_layers", where=where)),
            "gpt2.attention.head_count": u32(_need(config, "n_head", "num_attention_heads", where=where)),
            "gpt2.attention.layer_norm_epsilon": f32(config.get("layer_norm_epsilon", 1e-5)),
        }
    if arch == "bert":
        return {
            "bert.context_length": u32(_need(config, "max_position_embeddings", where=where)),
            "bert.embedding_length": u32(_need(config, "hidden_size", where=where)),
            "bert.feed_forward_length": u32(_need(config, "intermediate_size", where=where)),
            "bert.block_count": u32(_need(config, "num_hidden_layers", where=where)),
            "bert.attention.head_count": u32(_need(config, "num_attention_heads", where=where)),
            "bert.attention.layer_norm_epsilon": f32(config.get("layer_norm_eps", 1e-12)),
            "bert.attention.causal": boolean(False),
        }
    raise UnsupportedError(f"{where}: no hyper-parameters for {arch}")


def _rope(config: dict[str, Any]) -> dict[str, Any]:
    rope = dict(config.get("rope_scaling") or {})
    rope.update(config.get("rope_parameters") or {})
    return rope


def _llama_hparams(arch: str, config: dict[str, Any], where: str) -> dict[str, Value]:
    n_head = _need(config, "num_attention_heads", where=where)
    n_embd = _need(config, "hidden_size", where=where)
    head_dim = config.get("head_dim") or n_embd // n_head
    rope = _rope(config)
    meta = {
        f"{arch}.context_length": u32(config.get("max_position_embeddings", 4096)),
        f"{arch}.embedding_length": u32(n_embd),
        f"{arch}.block_count": u32(_need(config, "num_hidden_layers", where=where)),
        f"{arch}.feed_forward_length": u32(_need(config, "intermediate_size", where=where)),
        f"{arch}.attention.head_count": u32(n_head),
        f"{arch}.attention.head_count_kv": u32(config.get("num_key_value_heads") or n_head),
        f"{arch}.rope.freq_base": f32(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        f"{arch}.attention.layer_norm_rms_epsilon": f32(config.get("rms_norm_eps", 1e-6)),
    }
    if arch == "llama":
        meta["llama.vocab_size"] = u32(_need(config, "vocab_size", where=where))
        meta["llama.rope.dimension_count"] = u32(head_dim)
    if config.get("head_dim"):
        meta[f"{arch}.attention.key_length"] = u32(head_dim)
        meta[f"{arch}.attention.value_length"] = u32(head_dim)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "linear":
        meta[f"{arch}.rope.scaling.type"] = string("linear")
        meta[f"{arch}.rope.scaling.factor"] = f32(rope["factor"])
    elif kind == "yarn":
        meta[f"{arch}.rope.scaling.type"] = string("yarn")
        meta[f"{arch}.rope.scaling.factor"] = f32(rope["factor"])
        meta[f"{arch}.rope.scaling.original_context_length"] = u32(rope["original_max_position_embeddings"])
    elif kind not in ("default", "llama3"):
        raise UnsupportedError(f"{where}: rope scaling {kind!r} is not supported (default, linear, yarn, llama3 are)")
    return meta


def llama3_rope_factors(config: dict[str, Any]) -> np.ndarray | None:
    """The ``rope_freqs.weight`` llama.cpp uses for llama3-style rope scaling, or None."""
    rope = _rope(config)
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    base = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def _permute(n_head: int) -> Transform:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs (per head: halves interleaved)."""
    def apply(w: np.ndarray) -> np.ndarray:
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return apply


def _transpose(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)


_LLAMA_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GPT2_LAYER = {
    "ln_1.weight": "attn_norm.weight", "ln_1.bias": "attn_norm.bias",
    "attn.c_attn.weight": "attn_qkv.weight", "attn.c_attn.bias": "attn_qkv.bias",
    "attn.c_proj.weight": "attn_output.weight", "attn.c_proj.bias": "attn_output.bias",
    "ln_2.weight": "ffn_norm.weight", "ln_2.bias": "ffn_norm.bias",
    "mlp.c_fc.weight": "ffn_up.weight", "mlp.c_fc.bias": "ffn_up.bias",
    "mlp.c_proj.weight": "ffn_down.weight", "mlp.c_proj.bias": "ffn_down.bias",
}
_BERT_LAYER = {
    "attention.self.query.weight": "attn_q.weight", "attention.self.query.bias": "attn_q.bias",
    "attention.self.key.weight": "attn_k.weight", "attention.self.key.bias": "attn_k.bias",
    "attention.self.value.weight": "attn_v.weight", "attention.self.value.bias": "attn_v.bias",
    "attention.output.dense.weight": "attn_output.weight", "attention.output.dense.bias": "attn_output.bias",
    "attention.output.LayerNorm.weight": "attn_output_norm.weight",
    "attention.output.LayerNorm.bias": "attn_output_norm.bias",
    "intermediate.dense.weight": "ffn_up.weight", "intermediate.dense.bias": "ffn_up.bias",
    "output.dense.weight": "ffn_down.weight", "output.dense.bias": "ffn_down.bias",
    "output.LayerNorm.weight": "layer_output_norm.weight", "output.LayerNorm.bias": "layer_output_norm.bias",
}
_GLOBAL = {
    "llama": {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"},
    "gpt2": {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
             "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias", "lm_head.weight": "output.weight"},
    "bert": {"embeddings.word_embeddings.weight": "token_embd.weight",
             "embeddings.position_embeddings.weight": "position_embd.weight",
             "embeddings.token_type_embeddings.weight": "token_types.weight",
             "embeddings.LayerNorm.weight": "token_embd_norm.weight",
             "embeddings.LayerNorm.bias": "token_embd_norm.bias"},
}
#: buffers and heads llama.cpp does not use
_SKIP = re.compile(r"(^|\.)(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias|embeddings\.position_ids)$"
                   r"|^(pooler|cls)\.")


def map_name(arch: str, hf_name: str, config: dict[str, Any]) -> tuple[str, Transform | None] | None:
    """(llama.cpp name, layout change) for one HF tensor; None for tensors llama.cpp does not use.
    Raises UnsupportedError for a tensor this architecture should not have."""
    family = "llama" if arch in ("llama", "qwen2") else arch
    name = hf_name
    for prefix in ("transformer.", "bert.") if family in ("gpt2", "bert") else ():
        if name.startswith(prefix):
            name = name[len(prefix):]
    if _SKIP.search(name):
        return None
    tied = config.get("tie_word_embeddings", family == "gpt2")
    if name in _GLOBAL[family]:
        target = _GLOBAL[family][name]
        if target == "output.weight" and tied:
            return None
        return target, None
    layer_re = {"llama": r"model\.layers\.(\d+)\.(.+)", "gpt2": r"h\.(\d+)\.(.+)",
                "bert": r"encoder\.layer\.(\d+)\.(.+)"}[family]
    m = re.fullmatch(layer_re, name)
    table = {"llama": _LLAMA_LAYER, "gpt2": _GPT2_LAYER, "bert": _BERT_LAYER}[family]
    if not m or m.group(2) not in table:
        raise UnsupportedError(f"tensor {hf_name!r} is not part of the {arch} architecture kiln converts")
    target = f"blk.{m.group(1)}.{table[m.group(2)]}"
    transform: Transform | None = None
    if arch == "llama" and m.group(2).startswith(("self_attn.q_proj", "self_attn.k_proj")):
        n_head = config["num_attention_heads"]
        if m.group(2).startswith("self_attn.k_proj"):
            n_head = config.get("num_key_value_heads") or n_head
        transform = _permute(n_head)
    if family == "gpt2" and m.group(2).endswith(".weight") and m.group(2).startswith(("attn.", "mlp.")):
        transform = _transpose  # Conv1D stores (in, out)
    return target, transform

