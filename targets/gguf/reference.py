"""A plain numpy forward pass of the architectures kiln emits as GGUF, written from the
llama.cpp conventions the file uses (Q/K rows in rotary-pair order for LLaMA,
GPT-2's fused QKV), so it checks the file rather than restating the converter.

Weights are read from a Checkpoint a layer at a time: the whole model is never in
memory. Used to verify GGUF artifacts when llama.cpp runs them, and (with a ``tap``
that sees the float32 input of every weight matrix product) to compute importance
matrices from calibration text (``targets.gguf.calibrate``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from compiler.errors import UnsupportedError
from compiler.importers.checkpoint import Checkpoint

#: ``tap(weight_name, x)``: called with the float32 (tokens, columns) input of each ``name.weight`` product
Tap = Callable[[str, np.ndarray], None]


def supported(ck: Checkpoint) -> str | None:
    """None when the reference can run this checkpoint, else why not."""
    if ck.arch not in ("llama", "qwen2", "gpt2", "bert"):
        return f"no numpy reference for the {ck.arch} architecture"
    kind = ck.get("{arch}.rope.scaling.type", "none")
    if kind not in ("none", "linear"):
        return f"no numpy reference for {kind} rope scaling"
    return None


def logits(ck: Checkpoint, tokens: list[int], tap: Tap | None = None) -> np.ndarray:
    """(len(tokens), vocab) float32 logits; for BERT, (len(tokens), n_embd) hidden states."""
    why = supported(ck)
    if why:
        raise UnsupportedError(why)
    return {"gpt2": _gpt2, "bert": _bert}.get(ck.arch, _llama)(ck, tokens, tap)


def _w(ck: Checkpoint, name: str) -> np.ndarray | None:
    t = ck.tensor(name)
    return None if t is None else t.load()


def _linear(x: np.ndarray, ck: Checkpoint, name: str, tap: Tap | None = None) -> np.ndarray:
    x = x.astype(np.float32)
    if tap is not None:
        tap(f"{name}.weight", x)
    y = (x @ _w(ck, f"{name}.weight").T).astype(np.float64)
    b = _w(ck, f"{name}.bias")
    return y + b if b is not None else y


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool = True) -> np.ndarray:
    """Attention; q (T, H, d), k/v (T, Hkv, d) with H a multiple of Hkv."""
    T, H, d = q.shape
    group = H // k.shape[1]
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) / math.sqrt(d)
    if causal:
        scores = scores + np.triu(np.full((T, T), -np.inf), 1)[None]
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, v).reshape(T, H * d)


def _rope(x: np.ndarray, pos: np.ndarray, n_rot: int, theta: float, scale: float, factors: np.ndarray | None,
          neox: bool) -> np.ndarray:
    """Rotate the first n_rot dims of each head: adjacent pairs (llama.cpp NORM) or halves (NEOX)."""
    inv = theta ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    if factors is not None:
        inv = inv / factors
    ang = (pos[:, None] * scale) * inv[None, :]  # (T, n_rot/2)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    out = x.astype(np.float64).copy()
    if neox:
        a, b = x[..., : n_rot // 2], x[..., n_rot // 2: n_rot]
        out[..., : n_rot // 2] = a * cos - b * sin
        out[..., n_rot // 2: n_rot] = a * sin + b * cos
    else:
        a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        out[..., 0:n_rot:2] = a * cos - b * sin
        out[..., 1:n_rot:2] = a * sin + b * cos
    return out


def _llama(ck: Checkpoint, tokens: list[int], tap: Tap | None = None) -> np.ndarray:
    n_layer = int(ck.get("{arch}.block_count"))
    n_head = int(ck.get("{arch}.attention.head_count"))
    n_kv = int(ck.get("{arch}.attention.head_count_kv", n_head))
    n_embd = int(ck.get("{arch}.embedding_length"))
    head_dim = int(ck.get("{arch}.attention.key_length", n_embd // n_head))
    n_rot = int(ck.get("{arch}.rope.dimension_count", head_dim))
    eps = float(ck.get("{arch}.attention.layer_norm_rms_epsilon", 1e-5))
    theta = float(ck.get("{arch}.rope.freq_base", 10000.0))
    scale = 1.0 / float(ck.get("{arch}.rope.scaling.factor", 1.0)) if ck.get("{arch}.rope.scaling.type") == "linear" else 1.0
    factors = _w(ck, "rope_freqs.weight")
    neox = ck.arch == "qwen2"
    T = len(tokens)
    pos = np.arange(T, dtype=np.float64)
    h = _w(ck, "token_embd.weight")[tokens].astype(np.float64)
    for i in range(n_layer):
        p = f"blk.{i}"
        x = _rms(h, _w(ck, f"{p}.attn_norm.weight"), eps)
        q = _linear(x, ck, f"{p}.attn_q", tap).reshape(T, n_head, head_dim)
        k = _linear(x, ck, f"{p}.attn_k", tap).reshape(T, n_kv, head_dim)
        v = _linear(x, ck, f"{p}.attn_v", tap).reshape(T, n_kv, head_dim)
        q = _rope(q, pos, n_rot, theta, scale, factors, neox)
        k = _rope(k, pos, n_rot, theta, scale, factors, neox)
        h = h + _linear(_attend(q, k, v), ck, f"{p}.attn_output", tap)
        x = _rms(h, _w(ck, f"{p}.ffn_norm.weight"), eps)
        gate = _linear(x, ck, f"{p}.ffn_gate", tap)
        up = _linear(x, ck, f"{p}.ffn_up", tap)
        h = h + _linear(gate / (1 + np.exp(-gate)) * up, ck, f"{p}.ffn_down", tap)
    h = _rms(h, _w(ck, "output_norm.weight"), eps)
    out = _w(ck, "output.weight")
    return h.astype(np.float32) @ (out if out is not None else _w(ck, "token_embd.weight")).T


def _gpt2(ck: Checkpoint, tokens: list[int], tap: Tap | None = None) -> np.ndarray:
    n_layer = int(ck.get("gpt2.block_count"))
    n_head = int(ck.get("gpt2.attention.head_count"))
    n_embd = int(ck.get("gpt2.embedding_length"))
    eps = float(ck.get("gpt2.attention.layer_norm_epsilon", 1e-5))
    T = len(tokens)
    h = (_w(ck, "token_embd.weight")[tokens] + _w(ck, "position_embd.weight")[:T]).astype(np.float64)
    d = n_embd // n_head
    for i in range(n_layer):
        p = f"blk.{i}"
        x = _layer_norm(h, _w(ck, f"{p}.attn_norm.weight"), _w(ck, f"{p}.attn_norm.bias"), eps)
        qkv = _linear(x, ck, f"{p}.attn_qkv", tap)
        q, k, v = (qkv[:, j * n_embd:(j + 1) * n_embd].reshape(T, n_head, d) for j in range(3))
        h = h + _linear(_attend(q, k, v), ck, f"{p}.attn_output", tap)
        x = _layer_norm(h, _w(ck, f"{p}.ffn_norm.weight"), _w(ck, f"{p}.ffn_norm.bias"), eps)
        u = _linear(x, ck, f"{p}.ffn_up", tap)
        u = 0.5 * u * (1 + np.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
        h = h + _linear(u, ck, f"{p}.ffn_down", tap)
    h = _layer_norm(h, _w(ck, "output_norm.weight"), _w(ck, "output_norm.bias"), eps)
    out = _w(ck, "output.weight")
    return h.astype(np.float32) @ (out if out is not None else _w(ck, "token_embd.weight")).T


def _bert(ck: Checkpoint, tokens: list[int], tap: Tap | None = None) -> np.ndarray:
    n_layer = int(ck.get("bert.block_count"))
    n_head = int(ck.get("bert.attention.head_count"))
    n_embd = int(ck.get("bert.embedding_length"))
    eps = float(ck.get("bert.attention.layer_norm_epsilon", 1e-12))
    T = len(tokens)
    d = n_embd // n_head
    h = _w(ck, "token_embd.weight")[tokens] + _w(ck, "position_embd.weight")[:T]
    types = _w(ck, "token_types.weight")
    if types is not None:
        h = h + types[0]
    h = _layer_norm(h.astype(np.float64), _w(ck, "token_embd_norm.weight"), _w(ck, "token_embd_norm.bias"), eps)
    erf_v = np.vectorize(math.erf)
    for i in range(n_layer):
        p = f"blk.{i}"
        q = _linear(h, ck, f"{p}.attn_q", tap).reshape(T, n_head, d)
        k = _linear(h, ck, f"{p}.attn_k", tap).reshape(T, n_head, d)
        v = _linear(h, ck, f"{p}.attn_v", tap).reshape(T, n_head, d)
        h = h + _linear(_attend(q, k, v, causal=False), ck, f"{p}.attn_output", tap)
        h = _layer_norm(h, _w(ck, f"{p}.attn_output_norm.weight"), _w(ck, f"{p}.attn_output_norm.bias"), eps)
        u = _linear(h, ck, f"{p}.ffn_up", tap)
        u = 0.5 * u * (1 + erf_v(u / math.sqrt(2)))
        h = h + _linear(u, ck, f"{p}.ffn_down", tap)
        h = _layer_norm(h, _w(ck, f"{p}.layer_output_norm.weight"), _w(ck, f"{p}.layer_output_norm.bias"), eps)
    return h.astype(np.float32)
