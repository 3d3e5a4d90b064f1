"""An importance matrix from calibration text, computed with kiln's own numpy forward pass.

``--emit gguf --quantize q4_k_m --calibration texts.txt`` does what ``llama-imatrix``
followed by ``llama-quantize --imatrix`` does, without a float GGUF in between:

- the text is tokenized whole with the checkpoint's tokenizer (``tokenizer.json`` through
  the ``tokenizers`` package for Hugging Face folders, llama.cpp's vocabulary for GGUF
  files) and cut into chunks of ``ctx`` tokens (512, llama-imatrix's default, or the
  model's context if shorter); as in llama-imatrix, the first token of each chunk is
  replaced by BOS when the tokenizer adds one, and batches under 16 tokens are not
  counted (a last partial chunk of 16 or more is);
- each chunk runs through ``targets.gguf.reference`` (the forward pass that verifies
  GGUF artifacts), whose tap sees the float32 input of every weight matrix product;
- per weight ``blk.*`` (llama-imatrix skips ``output.weight`` by default, and so does
  this), the importance of input column j is the mean over all tokens of x_j^2 -- the
  ``in_sum2 / counts`` that llama-quantize reads from an imatrix file.

The result has the shape ``targets.gguf.imatrix.load_imatrix`` returns, and the
quantizers use it exactly as they use a file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from compiler.errors import KilnError, UnsupportedError
from compiler.importers.checkpoint import Checkpoint
from compiler.progress import Progress

#: llama-imatrix's default context (tokens per chunk)
DEFAULT_CTX = 512
#: llama.cpp's imatrix collector ignores products over fewer tokens than this
MIN_TOKENS = 16


@dataclasses.dataclass
class ImatrixStats:
    """Running sums of squared inputs per weight: llama-imatrix's ``in_sum2`` and ``counts``."""

    sums: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, name: str, x: np.ndarray) -> None:
        if not name.startswith("blk.") or x.shape[0] < MIN_TOKENS:
            return
        x64 = x.astype(np.float64)
        sq = np.einsum("tj,tj->j", x64, x64)
        if name in self.sums:
            self.sums[name] += sq
        else:
            self.sums[name] = sq
        self.counts[name] = self.counts.get(name, 0) + x.shape[0]

    def means(self) -> dict[str, np.ndarray]:
        return {name: (s / self.counts[name]).astype(np.float32) for name, s in self.sums.items()}


def tokenize(ck: Checkpoint, text: str) -> list[int]:
    """The checkpoint's own tokenization of ``text``, without special tokens."""
    if ck.source_format == "gguf":
        return _tokenize_llama_cpp(Path(ck.path), text)
    folder = Path(ck.path)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise KilnError(f"--calibration needs the checkpoint's tokenizer.json to tokenize the text; {folder} has none")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise KilnError("--calibration on a Hugging Face checkpoint needs the tokenizers package",
                        hint="pip install tokenizers") from None
    return list(Tokenizer.from_file(str(path)).encode(text, add_special_tokens=False).ids)


def _tokenize_llama_cpp(path: Path, text: str) -> list[int]:
    try:
        import llama_cpp
    except ImportError:
        raise KilnError("--calibration on a GGUF file needs llama-cpp-python to tokenize the text") from None
    from targets.gguf.run import _quiet_stderr

    with _quiet_stderr():  # llama.cpp logs the load from C
        vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        return list(vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False))
    finally:
        vocab.close()


def _adds_bos(ck: Checkpoint) -> bool:
    add = ck.get("tokenizer.ggml.add_bos_token")
    if add is None:  # llama.cpp's default: SentencePiece vocabularies add BOS, the others do not
        add = ck.get("tokenizer.ggml.model") == "llama"
    return bool(add) and ck.get("tokenizer.ggml.bos_token_id") is not None


def chunks(ck: Checkpoint, tokens: list[int], ctx: int) -> list[list[int]]:
    """Chunks of ``ctx`` tokens (the last one kept if it has MIN_TOKENS or more), BOS first where the
    tokenizer adds it."""
    out = []
    bos = int(ck.get("tokenizer.ggml.bos_token_id", 0)) if _adds_bos(ck) else None
    for start in range(0, len(tokens), ctx):
        chunk = list(tokens[start:start + ctx])
        if len(chunk) < MIN_TOKENS:
            break
        if bos is not None:
            chunk[0] = bos
        out.append(chunk)
    return out


def read_text(path: str | Path) -> str:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise KilnError(f"--calibration {path}: the folder has no .txt files")
        return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    if not path.is_file():
        raise KilnError(f"--calibration {path}: no such file")
    return path.read_text(encoding="utf-8", errors="replace")


def imatrix_from_text(ck: Checkpoint, path: str | Path, ctx: int | None = None, quiet: bool = False,
                      log: Callable[[str], None] | None = None) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """(per-weight importance, {"tokens": ..., "chunks": ..., "ctx": ...}) from the text at ``path``."""
    from targets.gguf import reference

    why = reference.supported(ck)
    if why:
        raise UnsupportedError(f"--calibration runs kiln's numpy forward pass, and there is {why}")
    if ck.arch == "bert":
        raise UnsupportedError("--calibration computes importance matrices for decoder LLMs; this is a BERT encoder")
    n_ctx = int(ck.get("{arch}.context_length", DEFAULT_CTX) or DEFAULT_CTX)
    ctx = min(ctx or DEFAULT_CTX, n_ctx)
    tokens = tokenize(ck, read_text(path))
    parts = chunks(ck, tokens, ctx)
    if not parts:
        raise KilnError(f"--calibration {path}: {len(tokens)} tokens, fewer than the {MIN_TOKENS} "
                        "an importance matrix needs")
    stats = ImatrixStats()
    done = 0
    with Progress("imatrix: chunks", len(parts), quiet=quiet) as bar:
        for chunk in parts:
            reference.logits(ck, chunk, tap=stats.add)
            done += len(chunk)
            bar.update(1, f"{done} tokens")
    info = {"tokens": sum(len(c) for c in parts), "chunks": len(parts), "ctx": ctx}
    if log:
        log(f"importance matrix from {info['tokens']} tokens of {path} ({info['chunks']} chunks of up to {ctx})")
    return stats.means(), info
