"""An LLM checkpoint as kiln holds it between import and emission.

Tensors are named and laid out the way llama.cpp expects them (``blk.0.attn_q.weight``,
Q/K rows permuted for LLaMA's rotary layout, GPT-2's Conv1D weights transposed),
and the hyper-parameters and tokenizer are GGUF metadata entries
(``llama.block_count``, ``tokenizer.ggml.tokens``...): llama.cpp's vocabulary is the
most widely shared description of these models, and it is what ``--emit gguf``
writes, so importers translate once, here.

Nothing is read until a tensor's ``load()`` is called, and each load reads
only that tensor: converting a model never holds more than one tensor at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import ModelFormatError

#: the GGUF architectures kiln imports and emits
ARCHITECTURES = ("llama", "qwen2", "gpt2", "bert")


@dataclasses.dataclass
class CheckpointTensor:
    name: str  # llama.cpp name
    shape: tuple[int, ...]  # numpy order (rows, columns)
    dtype: str  # ggml type of the stored data: F32, F16, BF16 (a quant type for GGUF sources)
    loader: Callable[[], np.ndarray]  # -> float32 array of ``shape``
    #: -> the stored bytes, for sources already in a ggml type (GGUF files), so they can be copied as-is
    raw: Callable[[], np.ndarray] | None = None

    def load(self) -> np.ndarray:
        data = self.loader()
        if data.shape != self.shape or data.dtype != np.float32:
            raise ModelFormatError(
                f"tensor {self.name}: read {data.dtype}{list(data.shape)}, expected float32{list(self.shape)}")
        return data

    @property
    def nbytes_f32(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * 4


@dataclasses.dataclass
class Checkpoint:
    arch: str
    metadata: dict[str, Any]  # GGUF key -> targets.gguf.format.Value
    tensors: list[CheckpointTensor]
    source_format: str  # hf-safetensors | hf-pytorch | gguf
    sha256: str
    path: Path
    #: things the conversion could not carry over exactly (shown in the manifest)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value; ``{arch}`` in the key is this architecture."""
        v = self.metadata.get(key.replace("{arch}", self.arch))
        return default if v is None else v.value

    def tensor(self, name: str) -> CheckpointTensor | None:
        return next((t for t in self.tensors if t.name == name), None)
