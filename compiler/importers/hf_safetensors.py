"""safetensors files, read one tensor at a time through a memory map of just that tensor.

The header (8-byte length, then JSON) is validated completely before any tensor
is touched: dtype known, shape and byte count consistent, offsets inside the
file. Each ``load`` maps only its tensor's bytes and drops the map after
converting, so the resident set stays at about one tensor.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from compiler.errors import ModelFormatError

#: safetensors dtype -> (numpy dtype of the stored items, ggml name when it is a float kiln converts)
DTYPES = {
    "F32": ("<f4", "F32"), "F16": ("<f2", "F16"), "BF16": ("<u2", "BF16"), "F64": ("<f8", "F32"),
    "I64": ("<i8", None), "I32": ("<i4", None), "I16": ("<i2", None), "I8": ("i1", None), "U8": ("u1", None),
    "BOOL": ("u1", None),
}
#: headers larger than this are refused (real ones are a few MB)
MAX_HEADER = 100 << 20


class SafetensorsEntry:
    def __init__(self, path: Path, name: str, dtype: str, shape: tuple[int, ...], start: int, nbytes: int) -> None:
        self.path, self.name, self.dtype, self.shape, self.start, self.nbytes = path, name, dtype, shape, start, nbytes

    @property
    def ggml_dtype(self) -> str | None:
        return DTYPES[self.dtype][1]

    def read(self) -> np.ndarray:
        """The tensor as float32 (a fresh array; the file map is released)."""
        if self.ggml_dtype is None:
            raise ModelFormatError(f"{self.path}: tensor {self.name!r} is {self.dtype}, not a float tensor")
        count = int(np.prod(self.shape, dtype=np.int64))
        if count == 0:
            return np.zeros(self.shape, np.float32)
        mapped = np.memmap(self.path, DTYPES[self.dtype][0], mode="r", offset=self.start, shape=(count,))
        try:
            if self.dtype == "BF16":
                out = (mapped.astype(np.uint32) << 16).view(np.float32)
            else:
                out = mapped.astype(np.float32)
        finally:
            del mapped
        return out.reshape(self.shape)


def read_header(path: Path) -> dict[str, SafetensorsEntry]:
    """Parse and check a safetensors header; a ModelFormatError names what is wrong."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _bad(path, "shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > MAX_HEADER or 8 + n > size:
            raise _bad(path, f"header length {n} does not fit the file of {size} bytes (truncated or not safetensors)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _bad(path, f"the header is not JSON ({err.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise _bad(path, "the header is not a JSON object")
    data_start = 8 + n
    data_size = size - data_start
    entries: dict[str, SafetensorsEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise _bad(path, f"tensor {name!r} lacks dtype, shape or data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise _bad(path, f"tensor {name!r} has unknown dtype {dtype!r}")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and o >= 0 for o in offsets)):
            raise _bad(path, f"tensor {name!r} has a malformed shape or data_offsets")
        begin, end = offsets
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype][0]).itemsize
        if end < begin or end - begin != expected:
            raise _bad(path, f"tensor {name!r}: {end - begin} bytes for {dtype}{shape} (needs {expected})")
        if end > data_size:
            raise _bad(path, f"tensor {name!r} ends at byte {end} of a {data_size}-byte data section (truncated?)")
        entries[name] = SafetensorsEntry(path, name, dtype, tuple(shape), data_start + begin, end - begin)
    return entries


def _bad(path: Path, why: str) -> ModelFormatError:
    return ModelFormatError(f"{path}: corrupt safetensors file: {why}")
