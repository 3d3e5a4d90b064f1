"""Which ggml type each tensor gets for a llama.cpp file type: the rules of llama.cpp's
``llama_tensor_get_type`` (src/llama-quant.cpp), restated for the architectures kiln emits.

The layer counters of those rules (``i_attention_wv``, ``i_ffn_down``) advance in
llama.cpp's tensor order: by layer number, then by name; :func:`llama_order` gives it.
"""

from __future__ import annotations

import dataclasses
import re

from compiler.errors import KilnError
from targets.gguf.quants import TYPES

#: kiln --quantize name -> (llama_ftype value, default ggml type); names follow llama-quantize
FTYPES: dict[str, tuple[int, str]] = {
    "f32": (0, "F32"),
    "f16": (1, "F16"),
    "bf16": (32, "BF16"),
    "q4_0": (2, "Q4_0"),
    "q4_1": (3, "Q4_1"),
    "q8_0": (7, "Q8_0"),
    "q5_0": (8, "Q5_0"),
    "q5_1": (9, "Q5_1"),
    "q2_k": (10, "Q2_K"),
    "q3_k_s": (11, "Q3_K"),
    "q3_k_m": (12, "Q3_K"),
    "q3_k_l": (13, "Q3_K"),
    "q4_k_s": (14, "Q4_K"),
    "q4_k_m": (15, "Q4_K"),
    "q5_k_s": (16, "Q5_K"),
    "q5_k_m": (17, "Q5_K"),
    "q6_k": (18, "Q6_K"),
}
#: llama-quantize's aliases
ALIASES = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}

#: substrings of names never quantized (llama.cpp's tensor_allows_quantization, for the arches here)
_NEVER = ("_norm.weight", "ffn_gate_inp.weight", "attn_rel_b.weight")
_NEVER_EXACT = ("position_embd.weight", "token_types.weight")


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the rules look at: the architecture and a few hyper-parameters."""

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        if self.n_layer != 80:
            return False
        return self.arch == "qwen2" or (self.arch == "llama" and self.n_head != self.n_head_kv)


def canonical(name: str) -> str:
    name = name.lower()
    return ALIASES.get(name, name)


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def llama_order(names: list[str]) -> list[str]:
    """llama.cpp's weights_map order: layer number (non-layer tensors first), then name."""
    return sorted(names, key=lambda n: (_layer(n), n))


def allows_quantization(name: str, ndim: int) -> bool:
    if ndim < 2 or not name.endswith("weight"):
        return False
    if name == "output.weight":
        return True
    return not any(s in name for s in _NEVER) and name not in _NEVER_EXACT


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _fallback(ne0: int, t: str) -> str:
    """tensor_type_fallback: a row length the type's block does not divide."""
    if ne0 % TYPES[t].block == 0:
        return t
    t2 = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}.get(t, t)
    return t2 if ne0 % TYPES[t2].block == 0 else "F16"


def tensor_types(tensors: list[tuple[str, int, int]], ftype: str, shape: ModelShape, pure: bool = False,
                 has_imatrix: bool = False) -> dict[str, str]:
    """{name: ggml type} for ``tensors`` = [(name, ne0 = row length, ndim)], as llama_model_quantize
    would choose for ``ftype`` starting from an F32 file. Tensors it keeps get "F32"."""
    ftype = canonical(ftype)
    if ftype not in FTYPES:
        raise KilnError(f"unknown GGUF file type {ftype!r}", hint=f"types: {', '.join(list(FTYPES) + list(ALIASES))}")
    default = FTYPES[ftype][1]
    info = {name: (ne0, ndim) for name, ne0, ndim in tensors}
    order = llama_order(list(info))
    tied = "output.weight" not in info
    n_attn_v = sum(1 for n in info if _category(n) in ("attn_v", "attn_qkv", "attn_kv_b"))
    counters = {"attn_v": 0, "ffn_down": 0}
    result: dict[str, str] = {}
    for name in order:
        ne0, ndim = info[name]
        if not allows_quantization(name, ndim):
            result[name] = "F32"
            continue
        t = default
        if TYPES[default].quantized:
            if not pure:
                t = _rule(name, ne0, t, ftype, shape, tied, n_attn_v, counters, has_imatrix)
            t = _fallback(ne0, t)
        result[name] = t
    return result


def _rule(name, ne0, t, ftype, shape, tied, n_attn_v, counters, has_imatrix) -> str:
    """llama_tensor_get_type_impl for the K-quant and legacy file types (no IQ types, one expert)."""
    cat = _category(name)
    n_layer = shape.n_layer
    if cat == "output" or (tied and cat == "token_embd"):
        if ne0 % TYPES[t].block != 0:
            return "Q8_0"
        return "Q6_K" if t != "Q8_0" else t
    if cat == "token_embd":
        return t
    if cat in ("attn_v", "attn_qkv", "attn_kv_b"):  # llama.cpp tests attn_v-like before attn_qkv
        i = counters["attn_v"]
        if ftype == "q2_k":
            t = "Q4_K" if shape.n_gqa >= 4 else "Q3_K"
        elif ftype == "q3_k_m":
            t = "Q5_K" if i < 2 else "Q4_K"
        elif ftype == "q3_k_l":
            t = "Q5_K"
        elif ftype in ("q4_k_m", "q5_k_m") and _more_bits(i, n_attn_v):
            t = "Q6_K"
        elif ftype == "q4_k_s" and i < 4:
            t = "Q5_K"
        if shape.is_70b and t in ("Q3_K", "Q4_K"):
            t = "Q5_K"
        if shape.n_expert == 8:
            t = "Q8_0"
        counters["attn_v"] += 1
        return t
    if cat == "attn_k":
        return "Q8_0" if shape.n_expert == 8 else t
    if cat == "ffn_down":
        i = counters["ffn_down"]
        counters["ffn_down"] += 1
        if ftype == "q2_k":
            return "Q3_K"
        if ftype == "q3_k_m":
            return "Q5_K" if i < n_layer // 16 else "Q4_K"
        if ftype == "q3_k_l":
            return "Q5_K"
        if ftype == "q4_k_m":
            return "Q6_K" if _more_bits(i, n_layer) else t
        if ftype == "q5_k_m" and _more_bits(i, n_layer):
            return "Q6_K"
        if ftype == "q4_k_s" and i < n_layer // 8:
            return "Q5_K"
        if ftype in ("q4_0", "q5_0") and has_imatrix and i < n_layer // 8:
            return "Q4_1" if ftype == "q4_0" else "Q5_1"
        return t
    if cat == "attn_output":
        if shape.n_expert == 8:
            if ftype in ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m"):
                return "Q5_K"
            return t
        return {"q2_k": "Q3_K", "q3_k_m": "Q4_K", "q3_k_l": "Q5_K"}.get(ftype, t)
    return t
