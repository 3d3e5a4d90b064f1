"""Greedy text generation with an LLM package and its packaged tokenizer (``kiln generate``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from compiler.errors import ArtifactError, KilnError
from targets.mlc.loader import Generation, LlmRunner


@dataclasses.dataclass
class TextGeneration:
    text: str
    generation: Generation


def open_package(path: str | Path) -> LlmRunner:
    """The runner of an LLM package folder (files checked against the manifest, shards against their md5)."""
    from compiler.api import load_artifact

    art = load_artifact(path)
    if art.manifest.get("emit") != "mlc" or art.manifest.get("backend", {}).get("kind") != "llm":
        raise KilnError(f"{path}: kiln generate runs LLM packages (--emit mlc from a Hugging Face checkpoint), "
                        f"not a {art.manifest.get('emit')} artifact of a graph")
    runner = art._runner
    assert isinstance(runner, LlmRunner)
    return runner


def tokenizer(folder: Path) -> Any:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise KilnError("kiln generate needs the tokenizers package", hint="pip install 'kiln[mlc]'") from None
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ArtifactError(f"{folder}: the package has no tokenizer.json (the checkpoint shipped none)",
                            hint="pass token ids to LlmRunner.generate from Python instead")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 (tokenizers raises its own Exception type)
        raise ArtifactError(f"{path}: the tokenizer cannot be read: {err}") from None


def encode(runner: LlmRunner, tok: Any, prompt: str) -> list[int]:
    ids = list(tok.encode(prompt).ids)
    bos = runner.config.get("bos_token_id")
    if runner.config.get("tokenizer_info", {}).get("add_bos") and bos is not None and ids[:1] != [bos]:
        ids.insert(0, int(bos))
    if not ids:
        raise KilnError("the prompt encodes to no tokens")
    return ids


def generate_text(path: str | Path, prompt: str, max_tokens: int, ignore_eos: bool = False) -> TextGeneration:
    if max_tokens < 1:
        raise KilnError(f"--max-tokens must be at least 1, got {max_tokens}")
    runner = open_package(path)
    tok = tokenizer(runner.folder)
    ids = encode(runner, tok, prompt)
    stop = () if ignore_eos else tuple(int(t) for t in runner.config.get("eos_token_id") or [])
    generation = runner.generate(ids, max_tokens, stop)
    return TextGeneration(tok.decode(generation.tokens, skip_special_tokens=True), generation)
