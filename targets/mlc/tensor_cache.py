"""The weight cache of an MLC package: ``tensor-cache.json`` + ``params_shard_N.bin``.

The layout ``tvm.contrib.tvmjs.load_tensor_cache`` and MLC-LLM's runtimes read::

    {"metadata": {"ParamSize": .., "ParamBytes": .., "BitsPerParam": ..},
     "records": [{"dataPath": "params_shard_0.bin", "format": "raw-shard", "nbytes": ..,
                  "md5sum": "..", "records": [{"name": .., "shape": [..], "dtype": "float32",
                                               "format": "raw", "nbytes": .., "byteOffset": ..}]}]}

Shards are filled up to ``SHARD_MB`` (a tensor larger than a shard gets one of
its own). Each tensor starts on a 64-byte boundary so the loader can hand the
memory-mapped bytes to TVM without a copy (TVM requires 64-byte aligned data).
Writing streams tensor by tensor; the md5 of each shard is computed as it is
written. Same tensors in the same order give the same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import ArtifactError

INDEX = "tensor-cache.json"
SHARD_PREFIX = "params_shard"
#: shard size in MB (MLC-LLM's default)
SHARD_MB = 32
ALIGN = 64
#: dtype names in the cache (TVM's spelling) -> numpy
DTYPES = {
    "float32": np.float32, "float16": np.float16, "float64": np.float64, "int8": np.int8, "uint8": np.uint8,
    "int16": np.int16, "uint16": np.uint16, "int32": np.int32, "uint32": np.uint32, "int64": np.int64,
    "uint64": np.uint64, "bool": np.bool_, "bfloat16": np.uint16,
}  # fmt: skip


def _dtype_name(array: np.ndarray) -> str:
    name = str(array.dtype)
    if name not in DTYPES:
        raise ArtifactError(f"cannot store a {name} tensor in a tensor cache")
    return name


class _Shard:
    def __init__(self, folder: Path, index: int) -> None:
        self.path = folder / f"{SHARD_PREFIX}_{index}.bin"
        self.file = open(self.path, "wb")
        self.md5 = hashlib.md5()
        self.nbytes = 0
        self.records: list[dict[str, Any]] = []

    def add(self, name: str, array: np.ndarray) -> None:
        pad = -self.nbytes % ALIGN
        if pad:
            self._write(b"\0" * pad)
        data = np.asarray(array)
        if not data.flags.c_contiguous:
            data = data.copy(order="C")  # (np.ascontiguousarray would make a 0-d array 1-d)
        self.records.append({"name": name, "shape": [int(d) for d in data.shape], "dtype": _dtype_name(data),
                             "format": "raw", "nbytes": int(data.nbytes), "byteOffset": self.nbytes})
        self._write(memoryview(data.reshape(-1).view(np.uint8)))

    def _write(self, data: Any) -> None:
        self.file.write(data)
        self.md5.update(data)
        self.nbytes += len(data)

    def close(self) -> dict[str, Any]:
        self.file.close()
        return {"dataPath": self.path.name, "format": "raw-shard", "nbytes": self.nbytes,
                "records": self.records, "md5sum": self.md5.hexdigest()}


def write(arrays: Iterable[tuple[str, np.ndarray]], folder: Path, shard_mb: int = SHARD_MB,
          metadata: dict[str, Any] | None = None) -> list[str]:
    """Write ``arrays`` (name, array) in order; returns the file names written, relative to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    cap = shard_mb << 20
    shards: list[dict[str, Any]] = []
    current: _Shard | None = None
    seen: set[str] = set()
    n_params = n_bytes = 0
    for name, array in arrays:
        if name in seen:
            raise ArtifactError(f"tensor {name!r} written twice to the tensor cache")
        seen.add(name)
        array = np.asarray(array)
        if current is not None and current.records and current.nbytes + array.nbytes > cap:
            shards.append(current.close())
            current = None
        if current is None:
            current = _Shard(folder, len(shards))
        current.add(name, array)
        n_params += int(array.size)
        n_bytes += int(array.nbytes)
    if current is not None:
        shards.append(current.close())
    meta = {"ParamSize": n_params, "ParamBytes": n_bytes,
            "BitsPerParam": round(8 * n_bytes / n_params, 4) if n_params else 0.0, **(metadata or {})}
    (folder / INDEX).write_text(json.dumps({"metadata": meta, "records": shards}, indent=1) + "\n")
    return [INDEX] + [s["dataPath"] for s in shards]


# ------------------------------------------------------------------ reading


@dataclasses.dataclass(frozen=True)
class Record:
    name: str
    shape: tuple[int, ...]
    dtype: str
    shard: str
    offset: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class Index:
    folder: Path
    metadata: dict[str, Any]
    shards: list[dict[str, Any]]  # dataPath, nbytes, md5sum
    records: list[Record]


def read_index(folder: Path) -> Index:
    """Parse and check ``tensor-cache.json`` (record bounds, sizes, names); ArtifactError names the fault."""
    path = folder / INDEX
    if not path.is_file():
        raise ArtifactError(f"{folder}: {INDEX} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        shards = data["records"]
        metadata = data.get("metadata") or {}
        if not isinstance(shards, list):
            raise TypeError("records is not a list")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ArtifactError(f"{path}: not a tensor cache index ({type(err).__name__}: {err})") from None
    records: list[Record] = []
    names: set[str] = set()
    for shard in shards:
        try:
            data_path, nbytes, fmt = shard["dataPath"], int(shard["nbytes"]), shard["format"]
            if fmt != "raw-shard" or os.path.basename(data_path) != data_path or data_path in ("", ".", ".."):
                raise ValueError(f"shard {data_path!r} ({fmt})")
            for rec in shard["records"]:
                r = Record(str(rec["name"]), tuple(int(d) for d in rec["shape"]), str(rec["dtype"]), data_path,
                           int(rec["byteOffset"]), int(rec["nbytes"]))
                if rec.get("format", "raw") != "raw" or r.dtype not in DTYPES:
                    raise ValueError(f"{r.name}: {rec.get('format')} {r.dtype} (kiln reads raw records)")
                itemsize = np.dtype(DTYPES[r.dtype]).itemsize
                if r.nbytes != int(np.prod(r.shape, dtype=np.int64)) * itemsize or r.offset < 0 \
                        or r.offset + r.nbytes > nbytes:
                    raise ValueError(f"{r.name}: {r.nbytes} bytes at {r.offset} for {r.dtype}{list(r.shape)} "
                                     f"in a {nbytes}-byte shard")
                if r.name in names:
                    raise ValueError(f"{r.name} recorded twice")
                names.add(r.name)
                records.append(r)
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"{path}: bad record: {err}") from None
    return Index(folder, metadata, shards, records)


def verify(index: Index) -> None:
    """Every shard present, of its recorded size and md5; ArtifactError names the first that is not."""
    for shard in index.shards:
        path = index.folder / shard["dataPath"]
        if not path.is_file():
            raise ArtifactError(f"{index.folder}: weight shard {shard['dataPath']} is missing")
        size = path.stat().st_size
        if size != int(shard["nbytes"]):
            raise ArtifactError(f"{path}: {size} bytes, {INDEX} records {shard['nbytes']} (truncated or replaced)")
        expected = shard.get("md5sum")
        if not expected:
            raise ArtifactError(f"{path}: {INDEX} records no md5sum for it")
        md5 = hashlib.md5()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                md5.update(chunk)
        if md5.hexdigest() != expected:
            raise ArtifactError(f"{path}: md5 {md5.hexdigest()} does not match {INDEX} ({expected}): "
                                "the weight shard is corrupt")


def map_arrays(index: Index) -> dict[str, np.ndarray]:
    """Every record as a numpy view of its memory-mapped shard (copy-on-write: the file is never written)."""
    maps = {s["dataPath"]: (np.memmap(index.folder / s["dataPath"], np.uint8, mode="c")
                            if int(s["nbytes"]) else np.zeros(0, np.uint8)) for s in index.shards}
    out = {}
    for r in index.records:
        raw = maps[r.shard][r.offset:r.offset + r.nbytes]
        out[r.name] = raw.view(DTYPES[r.dtype]).reshape(r.shape)
    return out
