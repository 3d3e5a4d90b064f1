"""Hugging Face tokenizer files -> llama.cpp's ``tokenizer.ggml.*`` metadata.

Three tokenizer models are recognized from ``tokenizer.json``:

- byte-level BPE (GPT-2, LLaMA 3, Qwen2, SmolLM): ``gpt2`` with merges, and a
  ``pre`` naming llama.cpp's pre-tokenizer regex, chosen by matching the
  tokenizer's own pre-tokenizer (kiln reads the regex rather than hashing a
  test string's tokens, so it needs no tokenizer library);
- SentencePiece-style BPE with byte fallback (LLaMA 2, Mistral): ``llama`` with
  per-token scores, from ``tokenizer.model`` when present, else derived from the
  merge ranks (a piece made by an earlier merge scores higher, which is the
  order llama.cpp's SPM tokenizer merges in);
- WordPiece (BERT): ``bert``, with the ``##`` continuation convention turned
  into llama.cpp's leading-space ("phantom space") form.

Special token ids, add-bos/eos flags and the chat template come from
``tokenizer_config.json``, the post-processor and ``config.json``, in the order
llama.cpp's converter uses.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from compiler.errors import ModelFormatError, UnsupportedError
from targets.gguf.format import FLOAT32, INT32, STRING, Value, array, boolean, string, u32

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
_ID_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "sep": "seperator_token_id",
            "pad": "padding_token_id", "cls": "cls_token_id", "mask": "mask_token_id"}

_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PRE = {_LLAMA3_RE: "llama-bpe", _QWEN2_RE: "qwen2"}


def tokenizer_metadata(folder: Path, config: dict[str, Any], warnings: list[str]) -> dict[str, Value]:
    """The tokenizer.ggml.* entries for a checkpoint folder ({} when it ships no tokenizer)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        warnings.append("no tokenizer.json: the GGUF has no vocabulary (llama.cpp needs one to run it)")
        return {}
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
        model = tj["model"]
        kind = model["type"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelFormatError(f"{path}: not a tokenizers JSON file ({type(err).__name__}: {err})") from None
    tc = _json_or_empty(folder / "tokenizer_config.json")
    n_vocab = int(config.get("vocab_size") or 0)
    added = {int(a["id"]): a for a in tj.get("added_tokens", []) if isinstance(a, dict) and "id" in a}
    if kind == "BPE" and not model.get("byte_fallback", False):
        meta = _gpt2(tj, added, n_vocab, warnings)
    elif kind == "BPE":
        meta = _spm(folder, tj, added, n_vocab)
    elif kind == "WordPiece":
        meta = _wordpiece(tj, added, n_vocab)
    else:
        raise UnsupportedError(f"{path}: tokenizer model {kind!r} is not supported",
                               hint="supported: byte-level BPE, SentencePiece-style BPE with byte fallback, WordPiece")
    n_tokens = len(meta["tokenizer.ggml.tokens"].value)
    meta.update(_special(folder, tj, tc, config, n_tokens))
    return meta


def _json_or_empty(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelFormatError(f"{path}: not valid JSON ({err})") from None
    return data if isinstance(data, dict) else {}


def _by_id(vocab: dict[str, int], added: dict[int, dict], n_vocab: int) -> list[str | None]:
    size = max([n_vocab, *(i + 1 for i in vocab.values()), *(i + 1 for i in added)])
    tokens: list[str | None] = [None] * size
    for text, i in vocab.items():
        tokens[i] = text
    for i, a in added.items():
        tokens[i] = a["content"]
    return tokens


def _looks_special(text: str) -> bool:
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>")) or (text.startswith("<unused") and text.endswith(">")))


def _gpt2(tj: dict, added: dict[int, dict], n_vocab: int, warnings: list[str]) -> dict[str, Value]:
    model = tj["model"]
    tokens, types = [], []
    for i, text in enumerate(_by_id(model["vocab"], added, n_vocab)):
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            special = bool(added[i].get("special")) or _looks_special(text)
            tokens.append(text if special else text.replace("\u2581", " "))
            types.append(CONTROL if special else USER_DEFINED)
        else:
            tokens.append(text)
            types.append(NORMAL)
    merges = _merges(model.get("merges") or [])
    pre = _bpe_pre(tj)
    if pre is None:
        pre = "default"
        warnings.append("the tokenizer's pre-tokenizer is not one kiln recognizes; wrote tokenizer.ggml.pre=default, "
                        "so llama.cpp may split text differently from Hugging Face")
    return {
        "tokenizer.ggml.model": string("gpt2"),
        "tokenizer.ggml.pre": string(pre),
        "tokenizer.ggml.tokens": array(STRING, tokens),
        "tokenizer.ggml.token_type": array(INT32, types),
        "tokenizer.ggml.merges": array(STRING, merges),
    }


def _merges(raw: list) -> list[str]:
    if raw and isinstance(raw[0], list):
        return [" ".join(part.replace(" ", chr(ord(" ") + 256)) for part in pair) for pair in raw]
    return [str(m) for m in raw]


def _bpe_pre(tj: dict) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer, read off its pre_tokenizer."""
    pt = tj.get("pre_tokenizer") or {}
    items = pt.get("pretokenizers", []) if pt.get("type") == "Sequence" else [pt]
    kinds = [p.get("type") for p in items]
    if kinds == ["ByteLevel"] and items[0].get("use_regex", True) and not items[0].get("add_prefix_space", False):
        return "gpt-2"
    if (kinds == ["Digits", "ByteLevel"] and items[0].get("individual_digits")
            and items[1].get("use_regex", True) and not items[1].get("add_prefix_space", False)):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not items[1].get("use_regex", True):
        pattern = (items[0].get("pattern") or {}).get("Regex")
        return _SPLIT_PRE.get(pattern)
    return None


def _spm(folder: Path, tj: dict, added: dict[int, dict], n_vocab: int) -> dict[str, Value]:
    model = tj["model"]
    vocab: dict[str, int] = model["vocab"]
    pieces = _sentencepiece_model(folder / "tokenizer.model")
    by_id = _by_id(vocab, added, n_vocab)
    if pieces is not None:
        scores_by_text = {p: s for p, s, _ in pieces}
    else:  # rank-derived: a piece produced by merge r scores -r
        scores_by_text = {}
        for rank, merge in enumerate(_merges(model.get("merges") or [])):
            left, _, right = merge.partition(" ")
            scores_by_text.setdefault(left + right, -float(rank))
    unk = model.get("unk_token")
    tokens, scores, types = [], [], []
    for i, text in enumerate(by_id):
        if text is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(UNUSED)
            continue
        tokens.append(text)
        scores.append(float(scores_by_text.get(text, -1000.0 if len(text) > 1 else 0.0)))
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types.append(BYTE)
        elif text == unk:
            types.append(UNKNOWN)
        elif i in added:
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        else:
            types.append(NORMAL)
    meta = {
        "tokenizer.ggml.model": string("llama"),
        "tokenizer.ggml.pre": string("default"),
        "tokenizer.ggml.tokens": array(STRING, tokens),
        "tokenizer.ggml.scores": array(FLOAT32, scores),
        "tokenizer.ggml.token_type": array(INT32, types),
    }
    meta["tokenizer.ggml.add_space_prefix"] = boolean(_adds_space_prefix(tj))
    return meta


def _adds_space_prefix(tj: dict) -> bool:
    """Whether the tokenizer prepends "▁" to the text (a Prepend normalizer, or Metaspace's prepend)."""
    def walk(node: Any) -> bool:
        if isinstance(node, dict):
            if node.get("type") == "Prepend" and node.get("prepend") == "\u2581":
                return True
            if node.get("type") == "Metaspace":
                return node.get("prepend_scheme", "always") != "never" and node.get("add_prefix_space", True)
            return any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False

    return walk(tj.get("normalizer")) or walk(tj.get("pre_tokenizer"))


def _sentencepiece_model(path: Path) -> list[tuple[str, float, int]] | None:
    """(piece, score, type) from a SentencePiece ModelProto, read off the protobuf wire format."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    pieces = []
    try:
        for field, wire, value in _fields(data):
            if field == 1 and wire == 2:
                piece, score, kind = "", 0.0, NORMAL
                for f2, w2, v2 in _fields(value):
                    if f2 == 1 and w2 == 2:
                        piece = v2.decode("utf-8")
                    elif f2 == 2 and w2 == 5:
                        score = struct.unpack("<f", v2)[0]
                    elif f2 == 3 and w2 == 0:
                        kind = int(v2)
                pieces.append((piece, score, kind))
    except (ValueError, IndexError, UnicodeDecodeError, struct.error):
        raise ModelFormatError(f"{path}: not a SentencePiece model") from None
    return pieces


def _fields(data: bytes):
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(data, pos)
            value, pos = data[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated")
        yield field, wire, value


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _wordpiece(tj: dict, added: dict[int, dict], n_vocab: int) -> dict[str, Value]:
    model = tj["model"]
    tokens, types = [], []
    for i, text in enumerate(_by_id(model["vocab"], added, n_vocab)):
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        special = (i in added and added[i].get("special")) or _looks_special(text)
        if special:
            tokens.append(text)
            types.append(CONTROL)
        elif text.startswith("##"):
            tokens.append(text[2:])
            types.append(NORMAL)
        else:
            tokens.append("\u2581" + text)
            types.append(NORMAL)
    return {
        "tokenizer.ggml.model": string("bert"),
        "tokenizer.ggml.pre": string("default"),
        "tokenizer.ggml.tokens": array(STRING, tokens),
        "tokenizer.ggml.token_type": array(INT32, types),
    }


def _special(folder: Path, tj: dict, tc: dict, config: dict, n_tokens: int) -> dict[str, Value]:
    """bos/eos/... ids, add_bos/add_eos, and the chat template."""
    ids: dict[str, int] = {}
    add: dict[str, bool] = {}
    added = [a for a in tj.get("added_tokens", []) if isinstance(a, dict)]
    tc = dict(tc)
    if not tc.get("bos_token") and tc.get("cls_token"):
        tc["bos_token"] = tc["cls_token"]
    if not tc.get("eos_token") and tc.get("sep_token"):
        tc["eos_token"] = tc["sep_token"]
    post = tj.get("post_processor") or {}
    for proc in post.get("processors", [post]) if isinstance(post, dict) else []:
        if proc.get("type") == "TemplateProcessing":
            single = proc.get("single") or []
            if len(single) > 1:
                first = (single[0].get("SpecialToken") or {}).get("id")
                last = (single[-1].get("SpecialToken") or {}).get("id")
                add["bos"] = bool(first)
                add["eos"] = bool(last)
                if first and not tc.get("bos_token"):
                    tc["bos_token"] = first
                if last and not tc.get("eos_token"):
                    tc["eos_token"] = last
        elif proc.get("type") in ("RobertaProcessing", "BertProcessing"):
            add["bos"] = add["eos"] = True
    for typ in SPECIAL_TYPES:
        flag = tc.get(f"add_{typ}_token")
        if isinstance(flag, bool) and typ not in add:
            add[typ] = flag
        entry = tc.get(f"{typ}_token")
        content = entry.get("content") if isinstance(entry, dict) else entry
        if isinstance(content, str):
            found = next((a.get("id") for a in added if a.get("content") == content), None)
            if isinstance(found, int) and 0 <= found < n_tokens:
                ids.setdefault(typ, found)
    for typ in SPECIAL_TYPES:
        value = config.get(f"{typ}_token_id")
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int) and 0 <= value < n_tokens:
            ids.setdefault(typ, value)
    meta: dict[str, Value] = {f"tokenizer.ggml.{_ID_KEYS[t]}": u32(i) for t, i in ids.items()}
    for typ in ("bos", "eos", "sep"):
        if typ in add:
            meta[f"tokenizer.ggml.add_{typ}_token"] = boolean(add[typ])
    template = tc.get("chat_template")
    jinja = folder / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    if isinstance(template, str):
        meta["tokenizer.chat_template"] = string(template)
    return meta

