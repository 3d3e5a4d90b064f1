"""The GGUF container (version 3): a streaming writer and a validating, memory-mapped reader.

Layout: magic ``GGUF``, version, tensor count, metadata count, the metadata
(key, typed value), the tensor infos (name, dims innermost-first, ggml type,
offset), padding to the alignment, then each tensor's bytes at its aligned offset.
The writer needs every tensor's type and shape up front (the header holds the
offsets) and then takes the tensor bytes one at a time, so no more than one
tensor is ever held in memory.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from compiler.errors import ModelFormatError

MAGIC = b"GGUF"
VERSION = 3
DEFAULT_ALIGNMENT = 32

# value types
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALAR = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f",
           BOOL: "<?", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}
_NUMPY = {UINT8: "<u1", INT8: "<i1", UINT16: "<u2", INT16: "<i2", UINT32: "<u4", INT32: "<i4", FLOAT32: "<f4",
          BOOL: "<u1", UINT64: "<u8", INT64: "<i8", FLOAT64: "<f8"}


@dataclasses.dataclass(frozen=True)
class Value:
    """A typed metadata value; arrays carry their element type in ``item``."""

    type: int
    value: Any
    item: int | None = None


def u32(v: int) -> Value:
    return Value(UINT32, int(v))


def i32(v: int) -> Value:
    return Value(INT32, int(v))


def f32(v: float) -> Value:
    return Value(FLOAT32, float(v))


def boolean(v: bool) -> Value:
    return Value(BOOL, bool(v))


def string(v: str) -> Value:
    return Value(STRING, str(v))


def array(item: int, values: Iterable[Any]) -> Value:
    return Value(ARRAY, list(values), item)


def _str_bytes(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return struct.pack("<Q", len(b)) + b


def _encode(v: Value) -> bytes:
    head = struct.pack("<I", v.type)
    if v.type == STRING:
        return head + _str_bytes(v.value)
    if v.type == ARRAY:
        head += struct.pack("<IQ", v.item, len(v.value))
        if v.item == STRING:
            return head + b"".join(_str_bytes(s) for s in v.value)
        if v.item == ARRAY:
            raise ValueError("nested GGUF arrays are not supported")
        return head + np.asarray(v.value, _NUMPY[v.item]).tobytes()
    return head + struct.pack(_SCALAR[v.type], v.value)


def _pad(n: int, alignment: int) -> int:
    return (alignment - n % alignment) % alignment


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: outermost first (GGUF stores it reversed)
    type_id: int
    nbytes: int


class Writer:
    """Write a GGUF file: ``Writer(path, metadata, infos)``, then ``write(name, data)`` per tensor,
    in the order of ``infos``, then ``close()`` (which checks every tensor was written)."""

    def __init__(self, path: str | os.PathLike, metadata: dict[str, Value], infos: list[TensorInfo],
                 alignment: int = DEFAULT_ALIGNMENT) -> None:
        self.alignment = alignment
        self.infos = infos
        self._next = 0
        self._file: BinaryIO = open(path, "wb")
        parts = [MAGIC, struct.pack("<IQQ", VERSION, len(infos), len(metadata))]
        for key, value in metadata.items():
            parts.append(_str_bytes(key))
            parts.append(_encode(value))
        offset = 0
        for info in infos:
            dims = tuple(reversed(info.shape))
            parts.append(_str_bytes(info.name))
            parts.append(struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, info.type_id, offset))
            offset += info.nbytes + _pad(info.nbytes, alignment)
        head = b"".join(parts)
        self._file.write(head + b"\0" * _pad(len(head), alignment))

    def write(self, name: str, data: np.ndarray | bytes) -> None:
        info = self.infos[self._next]
        if info.name != name:
            raise ValueError(f"tensor {name!r} written out of order (expected {info.name!r})")
        buf = memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray) else memoryview(data)
        if buf.nbytes != info.nbytes:
            raise ValueError(f"tensor {name!r}: {buf.nbytes} bytes, its header says {info.nbytes}")
        self._file.write(buf)
        self._file.write(b"\0" * _pad(info.nbytes, self.alignment))
        self._next += 1

    def close(self) -> None:
        try:
            if self._next != len(self.infos):
                raise ValueError(f"{len(self.infos) - self._next} tensor(s) were never written")
        finally:
            self._file.close()

    def abort(self) -> None:
        """Close without the completeness check (after an error; the caller discards the file)."""
        self._file.close()


@dataclasses.dataclass(frozen=True)
class ReadTensor:
    name: str
    shape: tuple[int, ...]  # numpy order
    type_id: int
    offset: int  # absolute, in the file
    nbytes: int


class Reader:
    """Parse a GGUF file's header; tensor data stays on disk (``data(t)`` maps one tensor).

    Every length and offset is checked against the file size before use, so a
    truncated or corrupt file is a ModelFormatError, never a crash or a huge allocation.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        from targets.gguf.quants import BY_ID

        self.path = Path(path)
        self.size = self.path.stat().st_size
        if self.size < 24:
            raise self._bad("the file is too short to be GGUF")
        self._map = np.memmap(self.path, np.uint8, mode="r")
        self._pos = 0
        if bytes(self._map[:4]) != MAGIC:
            raise self._bad("no GGUF magic at the start")
        self._pos = 4
        version, n_tensors, n_kv = struct.unpack("<IQQ", self._take(20))
        if version not in (2, 3):
            raise self._bad(f"GGUF version {version} (kiln reads 2 and 3)")
        if n_tensors > self.size // 24 or n_kv > self.size // 12:
            raise self._bad(f"implausible counts ({n_tensors} tensors, {n_kv} metadata entries)")
        self.metadata: dict[str, Value] = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = struct.unpack("<I", self._take(4))
            self.metadata[key] = self._value(vtype)
        self.alignment = int(self.metadata.get("general.alignment", Value(UINT32, DEFAULT_ALIGNMENT)).value)
        if self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise self._bad(f"alignment {self.alignment} is not a power of two")
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (ndim,) = struct.unpack("<I", self._take(4))
            if ndim > 8:
                raise self._bad(f"tensor {name!r} has {ndim} dimensions")
            dims = struct.unpack(f"<{ndim}Q", self._take(8 * ndim))
            type_id, offset = struct.unpack("<IQ", self._take(12))
            infos.append((name, tuple(reversed(dims)), type_id, offset))
        self.data_start = self._pos + _pad(self._pos, self.alignment)
        self.tensors: list[ReadTensor] = []
        for name, shape, type_id, offset in infos:
            t = BY_ID.get(type_id)
            if t is None:
                raise self._bad(f"tensor {name!r} has ggml type {type_id}, which kiln does not read")
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if shape and (shape[-1] % t.block):
                raise self._bad(f"tensor {name!r}: row of {shape[-1]} is not a whole number of {t.name} blocks")
            nbytes = count // t.block * t.size
            start = self.data_start + offset
            if offset % self.alignment or start + nbytes > self.size:
                raise self._bad(f"tensor {name!r} lies outside the file (offset {offset}, {nbytes} bytes)"
                                " — truncated?")
            self.tensors.append(ReadTensor(name, shape, type_id, start, nbytes))

    def data(self, t: ReadTensor) -> np.ndarray:
        """The raw bytes of a tensor, mapped on their own: dropping the array unmaps them,
        so reading tensors one by one never keeps the whole file resident."""
        if t.nbytes == 0:
            return np.zeros(0, np.uint8)
        return np.memmap(self.path, np.uint8, mode="r", offset=t.offset, shape=(t.nbytes,))

    def get(self, key: str, default: Any = None) -> Any:
        v = self.metadata.get(key)
        return default if v is None else v.value

    def _bad(self, why: str) -> ModelFormatError:
        return ModelFormatError(f"{self.path}: not a valid GGUF file: {why}")

    def _take(self, n: int) -> bytes:
        if n < 0 or self._pos + n > self.size:
            raise self._bad("the header runs past the end of the file (truncated?)")
        b = bytes(self._map[self._pos:self._pos + n])
        self._pos += n
        return b

    def _string(self) -> str:
        (n,) = struct.unpack("<Q", self._take(8))
        try:
            return self._take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise self._bad("a string is not UTF-8") from None

    def _value(self, vtype: int) -> Value:
        if vtype == STRING:
            return Value(STRING, self._string())
        if vtype == ARRAY:
            item, n = struct.unpack("<IQ", self._take(12))
            if item == STRING:
                return Value(ARRAY, [self._string() for _ in range(n)], item)
            if item not in _NUMPY:
                raise self._bad(f"array of unsupported element type {item}")
            width = np.dtype(_NUMPY[item]).itemsize
            raw = self._take(width * n)
            return Value(ARRAY, np.frombuffer(raw, _NUMPY[item]).tolist(), item)
        if vtype not in _SCALAR:
            raise self._bad(f"metadata value of unknown type {vtype}")
        fmt = _SCALAR[vtype]
        return Value(vtype, struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0])
