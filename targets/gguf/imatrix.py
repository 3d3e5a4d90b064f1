"""llama.cpp importance-matrix files -> per-tensor weights (one float per column).

Two formats, as llama-quantize reads them: GGUF (``NAME.in_sum2`` and ``NAME.counts``
tensors; weights = sums / counts, or 1 where a count is 0) and the legacy ``.dat``
(int32 entries; per entry name, ncall, nval, nval floats; weights = sums / ncall).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from compiler.errors import KilnError, ModelFormatError


def read_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise KilnError(f"--quantize imatrix={path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    return _gguf(path) if magic == b"GGUF" else _legacy(path)


def _gguf(path: Path) -> dict[str, np.ndarray]:
    from targets.gguf.format import Reader
    from targets.gguf.quants import BY_ID

    reader = Reader(path)
    sums, counts = {}, {}
    for t in reader.tensors:
        if BY_ID[t.type_id].name != "F32":
            raise ModelFormatError(f"{path}: imatrix tensor {t.name} is not F32")
        data = np.array(reader.data(t)).view(np.float32)
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = data
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = data
    out = {}
    for name, s in sums.items():
        if name not in counts:
            raise ModelFormatError(f"{path}: imatrix entry {name} has sums but no counts")
        c = np.round(counts[name]).astype(np.int64).astype(np.float32)
        per = s.reshape(c.size, -1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[name] = np.where(c[:, None] > 0, per / np.where(c > 0, c, 1)[:, None], np.float32(1)).astype(np.float32).reshape(-1)
    return out


def _legacy(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise ModelFormatError(f"{path}: truncated imatrix file")
        chunk = data[pos:pos + n]
        pos += n
        return chunk

    (n_entries,) = struct.unpack("<i", take(4))
    if n_entries < 1:
        raise ModelFormatError(f"{path}: not an imatrix file (neither GGUF nor the legacy format)")
    out = {}
    for _ in range(n_entries):
        (length,) = struct.unpack("<i", take(4))
        if length < 0:
            raise ModelFormatError(f"{path}: corrupt imatrix entry")
        name = take(length).decode("utf-8", "replace")
        ncall, nval = struct.unpack("<ii", take(8))
        if nval < 1:
            raise ModelFormatError(f"{path}: corrupt imatrix entry {name}")
        sums = np.frombuffer(take(4 * nval), "<f4").astype(np.float32)
        out[name] = sums / np.float32(ncall) if ncall > 0 else sums.copy()
    return out


def load_imatrix(path: str | Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The weights for the tensors of this model that the file covers; a size that does not match a
    tensor's row length is an error (except for token_embd, which llama.cpp skips too)."""
    return select(read_imatrix(path), shapes, f"imatrix {path}")


def select(values: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]], where: str) -> dict[str, np.ndarray]:
    """The entries of ``values`` that belong to 2-D tensors of this model, checked against their rows."""
    out = {}
    for name, shape in shapes.items():
        if name not in values or len(shape) < 2:
            continue
        v = values[name]
        if v.size != shape[-1]:
            if name == "token_embd.weight":
                continue
            raise KilnError(f"{where}: {v.size} values for {name}, whose rows have {shape[-1]}")
        if not np.isfinite(v).all():
            raise KilnError(f"{where}: non-finite values for {name}")
        out[name] = v
    return out
