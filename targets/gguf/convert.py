"""Checkpoint -> GGUF file, one tensor at a time.

Each tensor's ggml type is chosen first (llama.cpp's per-tensor rules for the
requested file type), which fixes every offset in the header; then tensors are
loaded, quantized and written one by one, so memory holds one float32 tensor and
its encoded form at most.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from compiler.errors import KilnError
from compiler.importers.checkpoint import Checkpoint, CheckpointTensor
from targets.gguf import format as gguf
from targets.gguf import mix
from targets.gguf.quants import TYPES, quantize

#: llama.cpp's GGML_QNT_VERSION
QUANTIZATION_VERSION = 2
#: general.file_type when no --quantize is given: the file type llama.cpp reports for the stored floats
_SOURCE_FTYPE = {"F32": 0, "F16": 1, "BF16": 32}


@dataclasses.dataclass
class Plan:
    ftype: str | None  # kiln/llama-quantize name, None = keep the source types
    types: dict[str, str]  # tensor name -> ggml type
    order: list[CheckpointTensor]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.types.values():
            out[t] = out.get(t, 0) + 1
        return dict(sorted(out.items()))


def model_shape(ck: Checkpoint) -> mix.ModelShape:
    n_head = int(ck.get("{arch}.attention.head_count", 1))
    return mix.ModelShape(ck.arch, int(ck.get("{arch}.block_count", 0)), n_head,
                          int(ck.get("{arch}.attention.head_count_kv", n_head)), int(ck.get("{arch}.expert_count", 0)))


def plan(ck: Checkpoint, ftype: str | None, pure: bool = False, has_imatrix: bool = False) -> Plan:
    by_name = {t.name: t for t in ck.tensors}
    order = [by_name[n] for n in mix.llama_order(list(by_name))]
    if ftype is None:
        types = {}
        for t in order:
            if t.dtype in TYPES and (TYPES[t.dtype].quantized or ck.source_format == "gguf"):
                types[t.name] = t.dtype  # a GGUF source keeps what it has
            elif mix.allows_quantization(t.name, len(t.shape)):
                types[t.name] = t.dtype if t.dtype in ("F32", "F16", "BF16") else "F32"
            else:
                types[t.name] = "F32"
        return Plan(None, types, order)
    listing = [(t.name, t.shape[-1] if t.shape else 1, len(t.shape)) for t in order]
    types = mix.tensor_types(listing, ftype, model_shape(ck), pure=pure, has_imatrix=has_imatrix)
    if ck.source_format == "gguf":  # tensors llama.cpp never quantizes keep their type, as llama-quantize does
        for t in order:
            if not mix.allows_quantization(t.name, len(t.shape)):
                types[t.name] = t.dtype
    return Plan(mix.canonical(ftype), types, order)


def file_type(ck: Checkpoint, p: Plan) -> int:
    """general.file_type: the requested llama.cpp file type, else what the stored floats are."""
    if p.ftype is not None:
        return mix.FTYPES[p.ftype][0]
    if ck.source_format == "gguf" and "general.file_type" in ck.metadata:
        return int(ck.metadata["general.file_type"].value)
    floats = {t for t in p.types.values() if t in ("F16", "BF16")}
    if not floats:
        return 0
    return _SOURCE_FTYPE[floats.pop()] if len(floats) == 1 else 1024


def metadata(ck: Checkpoint, p: Plan) -> dict[str, gguf.Value]:
    meta = {k: v for k, v in ck.metadata.items()
            if k not in ("general.file_type", "general.quantization_version", "general.alignment")}
    meta["general.file_type"] = gguf.u32(file_type(ck, p))
    if any(TYPES[t].quantized for t in p.types.values()):
        meta["general.quantization_version"] = gguf.u32(QUANTIZATION_VERSION)
    return meta


def encode(t: CheckpointTensor, ggml_type: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """One tensor in ``ggml_type`` (uint8 bytes, rows last as ggml stores them)."""
    if t.raw is not None and t.dtype == ggml_type:
        return np.asarray(t.raw())
    data = t.load()
    rows = data.reshape(-1, data.shape[-1]) if data.ndim else data.reshape(1, 1)
    return quantize(rows, ggml_type, imatrix)


def write(ck: Checkpoint, p: Plan, path: Path, imatrix: dict[str, np.ndarray] | None = None,
          progress: Callable[[str], None] | None = None) -> None:
    infos = []
    for t in p.order:
        gt = TYPES[p.types[t.name]]
        ncols = t.shape[-1] if t.shape else 1
        if ncols % gt.block:
            raise KilnError(f"tensor {t.name}: rows of {ncols} do not fit {gt.name} blocks of {gt.block}")
        count = int(np.prod(t.shape, dtype=np.int64)) if t.shape else 1
        infos.append(gguf.TensorInfo(t.name, t.shape or (1,), gt.id, count // gt.block * gt.size))
    writer = gguf.Writer(path, metadata(ck, p), infos)
    try:
        for t in p.order:
            weights = (imatrix or {}).get(t.name)
            writer.write(t.name, encode(t, p.types[t.name], weights if TYPES[p.types[t.name]].quantized else None))
            if progress:
                progress(t.name)
    except BaseException:
        writer.abort()  # the staging folder holding the partial file is removed by the driver
        raise
    writer.close()
