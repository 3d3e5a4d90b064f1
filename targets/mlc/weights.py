"""A LLaMA-family Checkpoint -> the package's model config and its parameters, one tensor at a time.

kiln's Checkpoint holds tensors under llama.cpp's names with LLaMA's Q/K rows
permuted into rotary pairs; the package uses Hugging Face's layout (rotate-half
rotary) under MLC-LLM's names (see ``llama``), so Q/K rows are permuted back
and q/k/v and gate/up are stacked. Quantized modes encode each linear and
embedding weight with ``group_quant.encode``; norms and biases stay in the
model's float type.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np

from compiler.errors import UnsupportedError
from compiler.importers.checkpoint import Checkpoint
from targets.mlc import group_quant
from targets.mlc.llama import LlamaConfig
from targets.mlc.modes import Mode

ARCHITECTURES = ("llama", "qwen2")


def config_of(ck: Checkpoint) -> LlamaConfig:
    if ck.arch not in ARCHITECTURES:
        raise UnsupportedError(f"--emit mlc does not package {ck.arch} checkpoints yet",
                               hint=f"supported: {', '.join(ARCHITECTURES)} (LlamaForCausalLM, MistralForCausalLM, "
                                    "Qwen2ForCausalLM)")
    n_head = int(ck.get("{arch}.attention.head_count"))
    hidden = int(ck.get("{arch}.embedding_length"))
    head_dim = int(ck.get("{arch}.attention.key_length", hidden // n_head))
    if int(ck.get("{arch}.rope.dimension_count", head_dim)) != head_dim:
        raise UnsupportedError("--emit mlc: partial rotary embeddings are not supported")
    kind = ck.get("{arch}.rope.scaling.type", "none")
    if kind not in ("none", "linear"):
        raise UnsupportedError(f"--emit mlc: {kind} rope scaling is not supported (default, linear, llama3 are)")
    theta = float(ck.get("{arch}.rope.freq_base", 10000.0))
    # Hugging Face's float32 arithmetic: 1 / theta ** (arange(0, d, 2) / d)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32)
                                                          / np.float32(head_dim)))).astype(np.float32)
    factors = ck.tensor("rope_freqs.weight")
    if factors is not None:  # llama3: per-frequency divisors
        inv_freq = (inv_freq / factors.load()).astype(np.float32)
    embd = ck.tensor("token_embd.weight")
    return LlamaConfig(
        vocab_size=int(embd.shape[0]),
        hidden_size=hidden,
        intermediate_size=int(ck.get("{arch}.feed_forward_length")),
        num_hidden_layers=int(ck.get("{arch}.block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=int(ck.get("{arch}.attention.head_count_kv", n_head)),
        head_dim=head_dim,
        rms_norm_eps=float(ck.get("{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        context_window_size=int(ck.get("{arch}.context_length", 4096)),
        attention_bias=ck.tensor("blk.0.attn_q.bias") is not None,
        tie_word_embeddings=ck.tensor("output.weight") is None,
        inv_freq=tuple(float(f) for f in inv_freq),
        position_scale=float(ck.get("{arch}.rope.scaling.factor", 1.0)) if kind == "linear" else 1.0,
    )


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary-pair rows -> Hugging Face's rotate-half rows (the inverse of the importer's permute)."""
    return np.ascontiguousarray(
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _float(ck: Checkpoint, name: str) -> np.ndarray:
    t = ck.tensor(name)
    if t is None:
        raise UnsupportedError(f"--emit mlc: the checkpoint lacks {name}")
    return t.load()


def _layer_tensor(ck: Checkpoint, config: LlamaConfig, layer: int, kind: str) -> np.ndarray:
    """One stacked float32 tensor of a layer: qkv (weight or bias) or gate_up."""
    p = f"blk.{layer}"
    if kind.startswith("qkv"):
        suffix = kind.split(".")[1]
        q, k, v = (_float(ck, f"{p}.attn_{x}.{suffix}") for x in "qkv")
        if ck.arch == "llama":
            q, k = _unpermute(q, config.num_attention_heads), _unpermute(k, config.num_key_value_heads)
        return np.concatenate([q, k, v], axis=0)
    return np.concatenate([_float(ck, f"{p}.ffn_gate.weight"), _float(ck, f"{p}.ffn_up.weight")], axis=0)


_LAYER_SOURCES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_SOURCES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                   "lm_head.weight": "output.weight"}


def _source(ck: Checkpoint, config: LlamaConfig, weight_name: str) -> np.ndarray:
    """The float32 value of a package weight (named as in the unquantized module)."""
    if weight_name in _GLOBAL_SOURCES:
        return _float(ck, _GLOBAL_SOURCES[weight_name])
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", weight_name)
    if not m:
        raise UnsupportedError(f"--emit mlc: no source for parameter {weight_name}")
    layer, rest = int(m.group(1)), m.group(2)
    if rest in _LAYER_SOURCES:
        return _float(ck, f"blk.{layer}.{_LAYER_SOURCES[rest]}")
    if rest == "self_attn.qkv_proj.weight":
        return _layer_tensor(ck, config, layer, "qkv.weight")
    if rest == "self_attn.qkv_proj.bias":
        return _layer_tensor(ck, config, layer, "qkv.bias")
    if rest == "mlp.gate_up_proj.weight":
        return _layer_tensor(ck, config, layer, "gate_up")
    raise UnsupportedError(f"--emit mlc: no source for parameter {weight_name}")


def parameters(ck: Checkpoint, config: LlamaConfig, mode: Mode, names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for every module parameter in ``names`` order, encoded for ``mode``."""
    pending: dict[str, np.ndarray] = {}
    for name in names:
        if name in pending:
            yield name, pending.pop(name)
            continue
        if name.endswith((".q_weight", ".q_scale")):
            base = name.rsplit(".", 1)[0]
            q_weight, q_scale = group_quant.encode(_source(ck, config, f"{base}.weight"), mode)
            pending[f"{base}.q_weight"], pending[f"{base}.q_scale"] = q_weight, q_scale
            yield name, pending.pop(name)
            continue
        yield name, _source(ck, config, name).astype(mode.model_dtype)
