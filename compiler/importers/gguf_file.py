"""GGUF files -> Checkpoint: metadata as it is, tensors kept in their stored ggml type
(copied through unchanged when the output keeps that type) or dequantized to float32."""

from __future__ import annotations

import hashlib
from pathlib import Path

from compiler.errors import UnsupportedError
from compiler.importers.checkpoint import ARCHITECTURES, Checkpoint, CheckpointTensor

_CHUNK = 1 << 22


def import_gguf(path: str | Path) -> Checkpoint:
    from targets.gguf.format import Reader
    from targets.gguf.quants import BY_ID, dequantize

    path = Path(path)
    reader = Reader(path)
    arch = reader.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedError(f"{path}: GGUF architecture {arch!r} is not supported",
                               hint=f"supported: {', '.join(ARCHITECTURES)}")
    tensors = []
    for t in reader.tensors:
        gtype = BY_ID[t.type_id].name

        def load(t=t, gtype=gtype):
            return dequantize(reader.data(t), gtype, t.shape).copy()

        def raw(t=t):
            return reader.data(t).copy()

        tensors.append(CheckpointTensor(t.name, t.shape, gtype, load, raw))
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return Checkpoint(arch, dict(reader.metadata), tensors, "gguf", digest.hexdigest(), path)
