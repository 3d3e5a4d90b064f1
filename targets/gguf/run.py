"""Run a GGUF artifact with llama.cpp (through llama-cpp-python, when it is installed).

Input ``input_ids`` (1, T) int32 token ids; output ``logits`` (1, T, vocab) float32, or for
encoders (BERT) ``embeddings`` (1, T, n_embd), the per-token hidden states. The KV cache is
kept in float32 so that an F32 file computes in float32 throughout.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import ArtifactError

#: GGML_TYPE_F32, for the KV cache
_F32 = 0


def available() -> str | None:
    """None when llama-cpp-python can be imported, else why not."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as err:  # ImportError, or a shared library that fails to load
        return f"llama-cpp-python is not importable ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    return None


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp logs to fd 2 from C; silence it while loading."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class LlamaCppRunner:
    def __init__(self, path: Path, n_ctx: int = 256, embeddings: bool = False) -> None:
        why = available()
        if why:
            raise ArtifactError(f"{path}: cannot run a GGUF artifact here: {why}",
                                hint='pip install llama-cpp-python (see the README for the build flags)')
        import llama_cpp

        self.path = path
        try:
            with _quiet_stderr():
                extra = {"embedding": True, "pooling_type": 0} if embeddings else {}  # 0: per-token, no pooling
                self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                           logits_all=True, type_k=_F32, type_v=_F32, verbose=False,
                                           n_threads=max(1, min(4, os.cpu_count() or 1)), **extra)
        except Exception as err:
            raise ArtifactError(f"{path}: llama.cpp cannot load it: {err}") from None
        self.n_ctx = n_ctx
        self.n_vocab = self.llm.n_vocab()
        self.embeddings = embeddings

    def _check(self, tokens: list[int]) -> None:
        if len(tokens) > self.n_ctx:
            raise ArtifactError(f"{len(tokens)} tokens exceed the runner's context of {self.n_ctx}")
        bad = [t for t in tokens if not 0 <= t < self.n_vocab]
        if bad:
            raise ArtifactError(f"token id {bad[0]} is outside the vocabulary of {self.n_vocab}")

    def logits(self, tokens: list[int]) -> np.ndarray:
        if not tokens:
            return np.zeros((0, self.n_vocab), np.float32)
        self._check(tokens)
        self.llm.reset()
        self.llm.eval(tokens)
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)

    def hidden_states(self, tokens: list[int]) -> np.ndarray:
        """Per-token embeddings of an encoder. Llama.embed() only takes text, so this drives the same
        llama-cpp-python internals it uses (batch, decode, llama_get_embeddings) with token ids."""
        import llama_cpp

        self._check(tokens)
        n_embd = self.llm.n_embd()
        self.llm._batch.reset()
        self.llm._batch.add_sequence(tokens, 0, True)
        self.llm._ctx.kv_cache_clear()
        self.llm._ctx.decode(self.llm._batch)
        ptr = llama_cpp.llama_get_embeddings(self.llm._ctx.ctx)
        out = np.ctypeslib.as_array(ptr, shape=(len(tokens) * n_embd,)).copy()
        self.llm._batch.reset()
        return out.reshape(len(tokens), n_embd)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.asarray(inputs["input_ids"])
        if ids.ndim != 2:
            raise ArtifactError(f"input_ids must be (batch, tokens), got shape {list(ids.shape)}")
        if self.embeddings:
            return {"embeddings": np.stack([self.hidden_states([int(t) for t in row]) for row in ids])}
        return {"logits": np.stack([self.logits([int(t) for t in row]) for row in ids])}


def load(artifact_dir: Path, manifest: dict[str, Any]) -> LlamaCppRunner:
    outputs = manifest["signature"]["outputs"]
    return LlamaCppRunner(artifact_dir / manifest["entry"], embeddings=outputs[0]["name"] == "embeddings")
