"""A numpy forward pass of a packaged LLaMA-family model, read from the package's own weights.

Written from Hugging Face's definition (rotate-half rotary, repeat_kv GQA,
SwiGLU), in float64, over the weights as the library sees them (quantized
weights decoded by ``group_quant.decode``, float16 widened), so comparing it
with the library checks the compiled kernels, not the encoding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from targets.mlc import group_quant
from targets.mlc.modes import Mode


def _weight(arrays: Mapping[str, np.ndarray], name: str, cols: int, mode: Mode) -> np.ndarray:
    if f"{name}.q_weight" in arrays:
        return group_quant.decode(arrays[f"{name}.q_weight"], arrays[f"{name}.q_scale"], cols, mode).astype(np.float64)
    return np.asarray(arrays[f"{name}.weight"], np.float64)


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def logits(arrays: Mapping[str, np.ndarray], cfg: Mapping[str, Any], mode: Mode, tokens: list[int]) -> np.ndarray:
    """(len(tokens), vocab) float32 logits of ``tokens`` from position 0."""
    d, hd = cfg["hidden_size"], cfg["head_dim"]
    n_q, n_kv, inter = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]
    eps = cfg["rms_norm_eps"]
    T = len(tokens)
    pos = np.arange(T, dtype=np.float32) / np.float32(cfg.get("position_scale", 1.0))
    angle = (pos[:, None] * np.asarray(cfg["inv_freq"], np.float32)[None, :]).astype(np.float64)
    angle = np.concatenate([angle, angle], axis=-1)[:, None, :]
    cos, sin = np.cos(angle), np.sin(angle)
    h = _weight(arrays, "model.embed_tokens", d, mode)[tokens]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        x = _rms(h, np.asarray(arrays[f"{p}.input_layernorm.weight"], np.float64), eps)
        qkv = x @ _weight(arrays, f"{p}.self_attn.qkv_proj", d, mode).T
        if f"{p}.self_attn.qkv_proj.bias" in arrays:
            qkv = qkv + np.asarray(arrays[f"{p}.self_attn.qkv_proj.bias"], np.float64)
        q = qkv[:, : n_q * hd].reshape(T, n_q, hd)
        k = qkv[:, n_q * hd : (n_q + n_kv) * hd].reshape(T, n_kv, hd)
        v = qkv[:, (n_q + n_kv) * hd :].reshape(T, n_kv, hd)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        k, v = np.repeat(k, n_q // n_kv, axis=1), np.repeat(v, n_q // n_kv, axis=1)
        scores = np.einsum("ihd,jhd->hij", q, k) / np.sqrt(hd) + mask
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = np.einsum("hij,jhd->ihd", probs, v).reshape(T, n_q * hd)
        h = h + attn @ _weight(arrays, f"{p}.self_attn.o_proj", n_q * hd, mode).T
        x = _rms(h, np.asarray(arrays[f"{p}.post_attention_layernorm.weight"], np.float64), eps)
        gate_up = x @ _weight(arrays, f"{p}.mlp.gate_up_proj", d, mode).T
        gate, up = gate_up[:, :inter], gate_up[:, inter:]
        h = h + (gate / (1 + np.exp(-gate)) * up) @ _weight(arrays, f"{p}.mlp.down_proj", inter, mode).T
    h = _rms(h, np.asarray(arrays["model.norm.weight"], np.float64), eps)
    head = "lm_head" if ("lm_head.weight" in arrays or "lm_head.q_weight" in arrays) else "model.embed_tokens"
    return (h @ _weight(arrays, head, d, mode).T).astype(np.float32)
