"""Read PyTorch ``.bin`` checkpoints (torch.save's zip format) without running their pickle.

A pickle can call any importable function while it loads, so ``torch.load`` on
an untrusted file runs whatever the file says. This unpickler resolves only the
names a state dict of tensors needs — ``torch._utils._rebuild_tensor_v2``
(and ``_rebuild_parameter``), the ``torch.*Storage`` type tags and
``collections.OrderedDict`` — and resolves them to kiln's own stand-ins, which
only record where each tensor's bytes are. Any other global is refused before
it is imported, let alone called. torch itself is never imported.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import ModelFormatError

#: torch storage type tag -> numpy dtype of its items
STORAGE_TYPES = {
    "FloatStorage": "<f4", "HalfStorage": "<f2", "BFloat16Storage": "<u2", "DoubleStorage": "<f8",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "u1",
}
FLOAT_STORAGES = {"FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16", "DoubleStorage": "F32"}


class _StorageType:
    def __init__(self, name: str) -> None:
        self.name = name


class _Storage:
    def __init__(self, kind: _StorageType, key: str, numel: int) -> None:
        self.kind, self.key, self.numel = kind, key, numel


class LazyTensor:
    """Where one tensor's values are: a storage entry of the zip, an offset, a shape and strides."""

    def __init__(self, storage: _Storage, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

    @property
    def ggml_dtype(self) -> str | None:
        return FLOAT_STORAGES.get(self.storage.kind.name)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, _Storage):
        raise ModelFormatError("a tensor in the pickle does not refer to a storage")
    shape, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if int(storage_offset) < 0 or any(s < 0 for s in shape) or any(s < 0 for s in stride):
        raise ModelFormatError("a tensor in the pickle has a negative offset, size or stride")
    last = int(storage_offset) + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
    if all(shape) and last >= storage.numel:
        raise ModelFormatError("a tensor in the pickle reaches past the end of its storage")
    return LazyTensor(storage, int(storage_offset), shape, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


_ALLOWED = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_TYPES},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, label: str) -> None:
        super().__init__(io.BytesIO(data))
        self.label = label

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise ModelFormatError(
                f"{self.label}: the pickle wants {module}.{name}; kiln loads only tensors from PyTorch files "
                "and refuses every other object (a pickle can run code)",
                hint="convert the checkpoint to safetensors, or re-save a plain state dict of tensors")
        return found

    def persistent_load(self, pid: Any) -> _Storage:
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str) or not isinstance(pid[4], int)):
            raise ModelFormatError(f"{self.label}: unexpected persistent id in the pickle")
        return _Storage(pid[1], pid[2], pid[4])


class TorchZip:
    """A torch.save zip: ``tensors`` maps state-dict names to LazyTensor; ``read(t)`` gives float32."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not zipfile.is_zipfile(path):
            raise ModelFormatError(
                f"{path}: not a zip-format PyTorch checkpoint (the legacy pre-1.6 format is not read)",
                hint="re-save it with a recent torch, or convert it to safetensors")
        try:
            self.zip = zipfile.ZipFile(path)
            pkl = [n for n in self.zip.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        except (zipfile.BadZipFile, OSError) as err:
            raise ModelFormatError(f"{path}: corrupt PyTorch zip ({err})") from None
        if len(pkl) != 1:
            raise ModelFormatError(f"{path}: expected one data.pkl in the PyTorch zip, found {len(pkl)}")
        self.prefix = pkl[0][: -len("data.pkl")]
        try:
            obj = _Unpickler(self.zip.read(pkl[0]), str(path)).load()
        except ModelFormatError:
            raise
        except Exception as err:  # malformed pickle opcodes and the like
            raise ModelFormatError(f"{path}: the pickle cannot be read ({type(err).__name__}: {err})") from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, LazyTensor) for k, v in obj.items()):
            raise ModelFormatError(f"{path}: the pickle is not a state dict of tensors")
        self.tensors: dict[str, LazyTensor] = dict(obj)

    def read(self, t: LazyTensor) -> np.ndarray:
        item = STORAGE_TYPES[t.storage.kind.name]
        try:
            raw = self.zip.read(f"{self.prefix}data/{t.storage.key}")
        except KeyError:
            raise ModelFormatError(f"{self.path}: storage {t.storage.key!r} is missing from the zip") from None
        width = np.dtype(item).itemsize
        if len(raw) < t.storage.numel * width:
            raise ModelFormatError(f"{self.path}: storage {t.storage.key!r} is shorter than the pickle says")
        flat = np.frombuffer(raw, item, count=t.storage.numel)
        view = np.lib.stride_tricks.as_strided(
            flat[t.offset:], shape=t.shape, strides=tuple(s * width for s in t.stride), writeable=False)
        if t.storage.kind.name == "BFloat16Storage":
            return (view.astype(np.uint32) << 16).view(np.float32)
        return view.astype(np.float32)
