"""Hugging Face checkpoint folders (config.json + safetensors or PyTorch .bin) -> Checkpoint.

Weights: ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``,
or ``pytorch_model.bin`` (sharded with its index), the latter through
``safe_unpickle`` (tensors only, nothing executed). Shard names from an index
must stay inside the folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import ModelFormatError, UnsupportedError
from compiler.importers import hf_arch
from compiler.importers.checkpoint import Checkpoint, CheckpointTensor
from compiler.importers.hf_safetensors import read_header
from compiler.importers.hf_tokenizer import tokenizer_metadata
from targets.gguf.format import string, u32

_CHUNK = 1 << 22


def import_checkpoint(folder: str | Path) -> Checkpoint:
    folder = Path(folder)
    where = str(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelFormatError(f"{folder / 'config.json'}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ModelFormatError(f"{folder / 'config.json'}: not a JSON object")
    arch = hf_arch.gguf_arch(config, where)
    sources, files, fmt = _weights(folder)
    tensors: list[CheckpointTensor] = []
    for hf_name, (reader, shape, dtype) in sources.items():
        try:
            mapped = hf_arch.map_name(arch, hf_name, config)
        except UnsupportedError as err:
            raise UnsupportedError(f"{where}: {err}") from None
        if mapped is None:
            continue
        name, transform = mapped
        if dtype is None:
            raise ModelFormatError(f"{where}: tensor {hf_name!r} is not a float tensor")
        out_shape = tuple(reversed(shape)) if transform is hf_arch._transpose else tuple(shape)
        tensors.append(CheckpointTensor(name, out_shape, dtype, _loader(reader, transform)))
    factors = hf_arch.llama3_rope_factors(config) if arch in ("llama", "qwen2") else None
    if factors is not None:
        tensors.append(CheckpointTensor("rope_freqs.weight", factors.shape, "F32", lambda f=factors: f.copy()))
    _check_complete(arch, tensors, config, where)
    warnings: list[str] = []
    metadata = {
        "general.architecture": string(arch),
        "general.name": string(str(config.get("_name_or_path") or folder.resolve().name)),
        **hf_arch.hparams(arch, config, where),
        **tokenizer_metadata(folder, config, warnings),
    }
    if arch in ("llama", "qwen2", "gpt2") and "tokenizer.ggml.tokens" in metadata:
        n_tokens = len(metadata["tokenizer.ggml.tokens"].value)
        embd = next(t for t in tensors if t.name == "token_embd.weight")
        if n_tokens != embd.shape[0]:
            raise ModelFormatError(f"{where}: the tokenizer has {n_tokens} tokens, the embedding {embd.shape[0]} rows")
    if arch == "llama":
        metadata["llama.vocab_size"] = u32(next(t for t in tensors if t.name == "token_embd.weight").shape[0])
    if arch == "bert":
        metadata["tokenizer.ggml.token_type_count"] = u32(config.get("type_vocab_size", 1))
        pooling = _sentence_transformers_pooling(folder)
        if pooling is not None:
            metadata["bert.pooling_type"] = u32(pooling)
    return Checkpoint(arch, metadata, tensors, fmt, _digest(folder, files), folder, warnings)


def _sentence_transformers_pooling(folder: Path) -> int | None:
    """llama.cpp's pooling type (1 mean, 2 cls, 3 last) from a sentence-transformers Pooling module."""
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        path = next(m["path"] for m in modules if m.get("type", "").endswith("Pooling"))
        cfg = json.loads((folder / path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, StopIteration, KeyError, TypeError, AttributeError):
        return None
    for key, kind in (("pooling_mode_mean_tokens", 1), ("pooling_mode_cls_token", 2), ("pooling_mode_lasttoken", 3)):
        if cfg.get(key):
            return kind
    return None


def _loader(reader, transform):
    def load() -> np.ndarray:
        data = reader()
        return np.ascontiguousarray(transform(data) if transform is not None else data, np.float32)
    return load


def _inside(folder: Path, name: str) -> Path:
    path = (folder / name).resolve()
    if Path(name).is_absolute() or not path.is_relative_to(folder.resolve()):
        raise ModelFormatError(f"{folder}: weight file {name!r} points outside the checkpoint folder")
    if not path.is_file():
        raise ModelFormatError(f"{folder}: weight file {name!r} is missing")
    return path


def _weights(folder: Path) -> tuple[dict[str, tuple[Any, tuple[int, ...], str | None]], list[Path], str]:
    """{hf name: (reader -> float32, shape, ggml dtype)}, the weight files, the source format."""
    for index_name, fmt in (("model.safetensors.index.json", "hf-safetensors"),
                            ("pytorch_model.bin.index.json", "hf-pytorch")):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ModelFormatError(f"{index}: not a weight index ({type(err).__name__})") from None
            files = sorted({_inside(folder, f) for f in weight_map.values()})
            return _read_files(files, fmt), files, fmt
    single = sorted(folder.glob("*.safetensors"))
    if single:
        return _read_files(single, "hf-safetensors"), single, "hf-safetensors"
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        return _read_files(bins, "hf-pytorch"), bins, "hf-pytorch"
    raise ModelFormatError(f"{folder}: no model.safetensors or pytorch_model.bin next to config.json")


def _read_files(files: list[Path], fmt: str) -> dict[str, tuple[Any, tuple[int, ...], str | None]]:
    out: dict[str, tuple[Any, tuple[int, ...], str | None]] = {}
    for path in files:
        if fmt == "hf-safetensors":
            for name, entry in read_header(path).items():
                out[name] = (entry.read, entry.shape, entry.ggml_dtype)
        else:
            from compiler.importers.safe_unpickle import TorchZip

            archive = TorchZip(path)
            for name, t in archive.tensors.items():
                out[name] = ((lambda a=archive, t=t: a.read(t)), t.shape, t.ggml_dtype)
    return out


def _check_complete(arch: str, tensors: list[CheckpointTensor], config: dict, where: str) -> None:
    names = {t.name for t in tensors}
    needed = ["token_embd.weight"]
    n_layer = config.get("num_hidden_layers") or config.get("n_layer") or 0
    per_layer = {
        "llama": ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                  "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"],
        "qwen2": ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                  "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight",
                  "attn_q.bias", "attn_k.bias", "attn_v.bias"],
        "gpt2": ["attn_norm.weight", "attn_qkv.weight", "attn_output.weight", "ffn_norm.weight", "ffn_up.weight",
                 "ffn_down.weight"],
        "bert": ["attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "ffn_up.weight",
                 "ffn_down.weight"],
    }[arch]
    needed += [f"blk.{i}.{n}" for i in range(n_layer) for n in per_layer]
    if arch != "bert":
        needed.append("output_norm.weight")
    missing = [n for n in needed if n not in names]
    if missing:
        raise ModelFormatError(f"{where}: {len(missing)} tensor(s) missing, first {missing[0]} (truncated checkpoint?)")


def _digest(folder: Path, files: list[Path]) -> str:
    """sha256 over config.json and the weight files, streamed."""
    h = hashlib.sha256()
    for path in [folder / "config.json", *files]:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()
