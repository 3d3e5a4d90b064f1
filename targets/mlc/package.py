"""The files of an MLC package besides the library and the weights: ``mlc-chat-config.json`` and the tokenizer.

``mlc-chat-config.json`` follows MLC-LLM's chat config (``model_type``,
``quantization``, ``model_config``, ``vocab_size``, ``context_window_size``,
``prefill_chunk_size``, ``tokenizer_files``, special token ids, sampling
defaults); the tokenizer files are copied unchanged from the checkpoint folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from compiler.errors import ArtifactError
from compiler.importers.checkpoint import Checkpoint
from targets.mlc.llama import LlamaConfig
from targets.mlc.modes import Mode

CHAT_CONFIG = "mlc-chat-config.json"
#: tokenizer files MLC-LLM packages carry (whichever the checkpoint has)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "special_tokens_map.json")
#: prompt tokens per prefill call
PREFILL_CHUNK = 2048


def copy_tokenizer(ck: Checkpoint, out_dir: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        src = Path(ck.path) / name
        if Path(ck.path).is_dir() and src.is_file():
            shutil.copyfile(src, out_dir / name)
            copied.append(name)
    return copied


def chat_config(ck: Checkpoint, config: LlamaConfig, mode: Mode, tokenizer_files: list[str],
                param_names: list[str]) -> dict[str, Any]:
    def token_id(kind: str) -> int | None:
        value = ck.get(f"tokenizer.ggml.{kind}_token_id")
        return int(value) if value is not None else None

    eos = token_id("eos")
    return {
        "version": "0.1.0",
        "model_type": ck.arch,
        "quantization": mode.name,
        "quantization_config": mode.to_json(),
        "model_config": config.to_json(),
        "vocab_size": config.vocab_size,
        "context_window_size": config.context_window_size,
        "prefill_chunk_size": min(PREFILL_CHUNK, config.context_window_size),
        "tensor_parallel_shards": 1,
        "temperature": 0.0,
        "top_p": 1.0,
        "tokenizer_files": tokenizer_files,
        "tokenizer_info": {"add_bos": bool(ck.get("tokenizer.ggml.add_bos_token", False))},
        "bos_token_id": token_id("bos"),
        "eos_token_id": [eos] if eos is not None else [],
        "pad_token_id": token_id("padding"),
        "chat_template": ck.get("tokenizer.chat_template"),
        # kiln: how the library is called (MLC-LLM reads these from the library's metadata function)
        "kiln_functions": {"create_kv_cache": "_initialize_effect", "prefill": "prefill", "decode": "decode"},
        "kiln_params": param_names,
    }


def write_chat_config(out_dir: Path, config: dict[str, Any]) -> str:
    (out_dir / CHAT_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    return CHAT_CONFIG


def read_chat_config(folder: Path) -> dict[str, Any]:
    path = folder / CHAT_CONFIG
    if not path.is_file():
        raise ArtifactError(f"{folder}: {CHAT_CONFIG} is missing (not an LLM package?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        data["model_config"], data["kiln_params"]  # noqa: B018 (presence check)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ArtifactError(f"{path}: not an MLC chat config kiln wrote ({type(err).__name__}: {err})") from None
    return data
