"""Calibration data: where it comes from, how it is fed, and the held-back evaluation split.

Sources (``--calibration PATH``):

- an ``.npz`` whose arrays are named after the model inputs (a single-input
  model may use any name), samples stacked along axis 0;
- a folder of ``.npz`` files (one batch each) or ``.npy`` files (single-input models);
- a folder of images (``.png .jpg .jpeg .bmp .tif``) for image models, decoded
  with Pillow and prepared by ``--calibration-preprocess``.

Batches are produced lazily (one file or one slice at a time), so a folder of
thousands of samples never sits in memory at once. ``split`` sets aside every
k-th batch as the evaluation data the report and the accuracy budget use.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import KilnError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_DTYPES = {"float": np.float32, "float32": np.float32, "float16": np.float16, "int64": np.int64,
           "int32": np.int32, "uint8": np.uint8, "int8": np.int8, "bool": np.bool_, "double": np.float64}

Feed = dict[str, np.ndarray]


class CalibrationSet:
    """A re-iterable sequence of input feeds (name -> array), loaded on demand."""

    def __init__(self, loaders: Sequence[Callable[[], Feed]], source: str = "in-memory") -> None:
        self._loaders = list(loaders)
        self.source = source

    @classmethod
    def from_feeds(cls, feeds: Sequence[Mapping[str, np.ndarray]], source: str = "in-memory") -> CalibrationSet:
        frozen = [dict(f) for f in feeds]
        return cls([lambda f=f: f for f in frozen], source)

    def __len__(self) -> int:
        return len(self._loaders)

    def __iter__(self) -> Iterator[Feed]:
        for load in self._loaders:
            yield load()

    def __getitem__(self, index: int) -> Feed:
        return self._loaders[index]()

    def subset(self, indices: Sequence[int]) -> CalibrationSet:
        return CalibrationSet([self._loaders[i] for i in indices], self.source)

    def split(self, holdout: float) -> tuple[CalibrationSet, CalibrationSet]:
        """(calibration, evaluation): every k-th batch held back so both spread over the source.

        With fewer than 2 batches both halves are the whole set (nothing can be held back).
        """
        n = len(self)
        if n < 2 or holdout <= 0:
            return self, self
        k = max(2, round(1 / holdout))
        held = [i for i in range(n) if i % k == k - 1] or [n - 1]
        kept = [i for i in range(n) if i not in set(held)]
        return self.subset(kept), self.subset(held)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Image preparation: resize the short side, center crop, scale, normalize, lay out."""

    resize: int | None = None  # short side after resizing (None: resize straight to the crop size)
    crop: int | None = None  # None: the model's input size
    scale: float = 255.0  # pixel values are divided by this first
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    PRESETS: Any = None  # filled below


_PRESETS = {
    "imagenet": Preprocess(resize=256, scale=255.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "unit": Preprocess(scale=255.0),
    "symmetric": Preprocess(scale=255.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    "raw": Preprocess(scale=1.0),
}


def parse_preprocess(text: str | None) -> Preprocess:
    """``imagenet`` | ``unit`` | ``symmetric`` | ``raw``, optionally followed by overrides:
    ``imagenet,resize=256,crop=224`` or ``scale=255,mean=0.5:0.5:0.5,std=0.5:0.5:0.5``."""
    if not text:
        return _PRESETS["imagenet"]
    parts = [p.strip() for p in text.split(",") if p.strip()]
    base = _PRESETS["imagenet"]
    if parts and "=" not in parts[0]:
        if parts[0] not in _PRESETS:
            raise KilnError(f"--calibration-preprocess: unknown preset {parts[0]!r}", hint=f"presets: {', '.join(_PRESETS)}")
        base = _PRESETS[parts.pop(0)]
    changes: dict[str, Any] = {}
    for part in parts:
        key, eq, raw = part.partition("=")
        try:
            if key in ("resize", "crop"):
                changes[key] = int(raw)
            elif key == "scale":
                changes[key] = float(raw)
            elif key in ("mean", "std"):
                changes[key] = tuple(float(x) for x in raw.split(":"))
            else:
                raise KeyError(key)
        except (KeyError, ValueError):
            raise KilnError(f"--calibration-preprocess: cannot read {part!r}",
                            hint="options: resize=N, crop=N, scale=X, mean=A:B:C, std=A:B:C") from None
    return dataclasses.replace(base, **changes)


def load_calibration(
    path: str | os.PathLike, inputs: Sequence[Mapping[str, Any]], *, preprocess: str | None = None,
    limit: int | None = None,
) -> CalibrationSet:
    """Open ``path`` as calibration data for a model with these signature ``inputs``
    (``compiler.signature`` entries: name, dtype, shape with None/str for symbolic dims)."""
    p = Path(path)
    if not p.exists():
        raise KilnError(f"--calibration {p}: no such file or folder")
    if p.is_file():
        if p.suffix != ".npz":
            raise KilnError(f"--calibration {p}: expected an .npz file or a folder")
        loaders = _npz_batches(p, inputs)
    else:
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
        images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
        arrays = [f for f in files if f.suffix in (".npz", ".npy")]
        if images and not arrays:
            loaders = [_image_loader(f, inputs, parse_preprocess(preprocess)) for f in images]
        elif arrays and not images:
            loaders = [_file_loader(f, inputs) for f in arrays]
        elif not files:
            raise KilnError(f"--calibration {p}: the folder is empty")
        else:
            raise KilnError(f"--calibration {p}: the folder must hold either images or .npz/.npy files, not "
                            + ("both" if images else "neither"))
    if limit is not None:
        loaders = loaders[:limit]
    if not loaders:
        raise KilnError(f"--calibration {p}: no samples")
    return CalibrationSet(loaders, str(p))


#: samples per batch fed to a model whose batch dimension is symbolic
SYMBOLIC_BATCH = 8


def _static_batch(shape: Sequence[Any] | None) -> bool:
    return bool(shape) and isinstance(shape[0], int) and shape[0] > 0


def _batch_size(shape: Sequence[Any]) -> int:
    first = shape[0] if shape else None
    return first if isinstance(first, int) and first > 0 else 1


def _conform(array: np.ndarray, spec: Mapping[str, Any], where: str) -> np.ndarray:
    want = _DTYPES.get(str(spec.get("dtype")), None)
    if want is not None and array.dtype != want:
        if array.dtype.kind == "f" and np.dtype(want).kind in "iub":
            raise KilnError(f"{where}: input {spec['name']!r} wants {np.dtype(want).name}, the data is {array.dtype.name}")
        array = array.astype(want)
    shape = spec.get("shape")
    if shape is not None:
        if array.ndim != len(shape):
            raise KilnError(f"{where}: input {spec['name']!r} has rank {len(shape)}, the data has shape {list(array.shape)}")
        for i, (have, dim) in enumerate(zip(array.shape, shape)):
            if isinstance(dim, int) and dim != have:
                raise KilnError(f"{where}: input {spec['name']!r} dimension {i} must be {dim}, the data has {have}")
    return array


def _npz_batches(path: Path, inputs: Sequence[Mapping[str, Any]]) -> list[Callable[[], Feed]]:
    try:
        data = np.load(path, allow_pickle=False)
        names = list(data.files)
    except Exception as err:
        raise KilnError(f"--calibration {path}: not a readable .npz ({type(err).__name__}: {err})") from None
    mapping = _match_names(names, inputs, str(path))
    arrays = {inp: data[key] for inp, key in mapping.items()}
    counts = {a.shape[0] for a in arrays.values()}
    if len(counts) != 1:
        raise KilnError(f"--calibration {path}: arrays have different sample counts {sorted(counts)}")
    n = counts.pop()
    static = [_batch_size(s.get("shape") or []) for s in inputs if _static_batch(s.get("shape"))]
    # a static batch dim fixes the batch; a symbolic one takes SYMBOLIC_BATCH samples per run
    step = min(static) if static else min(SYMBOLIC_BATCH, n)
    specs = {s["name"]: s for s in inputs}

    def loader(start: int) -> Callable[[], Feed]:
        return lambda: {k: _conform(a[start : start + step], specs[k], str(path)) for k, a in arrays.items()}

    end = n - n % step if static else n  # a static batch cannot take a short last batch
    return [loader(i) for i in range(0, end, step)]


def _match_names(names: Sequence[str], inputs: Sequence[Mapping[str, Any]], where: str) -> dict[str, str]:
    wanted = [s["name"] for s in inputs]
    if set(wanted) <= set(names):
        return {w: w for w in wanted}
    if len(wanted) == 1 and len(names) == 1:
        return {wanted[0]: names[0]}
    missing = [w for w in wanted if w not in names]
    raise KilnError(f"--calibration {where}: no array for model input(s) {', '.join(missing)}",
                    hint=f"the file has: {', '.join(names) or 'nothing'}")


def _file_loader(path: Path, inputs: Sequence[Mapping[str, Any]]) -> Callable[[], Feed]:
    specs = {s["name"]: s for s in inputs}

    def load() -> Feed:
        try:
            if path.suffix == ".npy":
                if len(inputs) != 1:
                    raise KilnError(f"--calibration {path}: .npy files only serve single-input models; use .npz")
                arrays = {inputs[0]["name"]: np.load(path, allow_pickle=False)}
            else:
                with np.load(path, allow_pickle=False) as data:
                    mapping = _match_names(list(data.files), inputs, str(path))
                    arrays = {k: data[v] for k, v in mapping.items()}
        except KilnError:
            raise
        except Exception as err:
            raise KilnError(f"--calibration {path}: unreadable ({type(err).__name__}: {err})") from None
        out = {}
        for name, array in arrays.items():
            shape = specs[name].get("shape") or []
            if len(shape) == array.ndim + 1:  # one sample without its batch axis
                array = array[None]
            out[name] = _conform(array, specs[name], str(path))
        return out

    return load


def _image_layout(inputs: Sequence[Mapping[str, Any]], where: str) -> tuple[str, int, int, str]:
    if len(inputs) != 1 or len(inputs[0].get("shape") or []) != 4:
        raise KilnError(f"--calibration {where}: image folders serve models with one 4-D image input")
    spec = inputs[0]
    shape = spec["shape"]
    if shape[1] == 3:
        layout, h, w = "nchw", shape[2], shape[3]
    elif shape[3] == 3:
        layout, h, w = "nhwc", shape[1], shape[2]
    else:
        raise KilnError(f"--calibration {where}: input {spec['name']!r} {shape} has no 3-channel axis (NCHW or NHWC)")
    if not (isinstance(h, int) and isinstance(w, int)):
        h = h if isinstance(h, int) else 224
        w = w if isinstance(w, int) else 224
    return layout, h, w, spec["name"]


def prepare_image(image: Any, pre: Preprocess, height: int, width: int, layout: str = "nchw") -> np.ndarray:
    """A PIL image -> float32 [1, 3, H, W] (or [1, H, W, 3])."""
    from PIL import Image

    image = image.convert("RGB")
    crop_h, crop_w = (pre.crop, pre.crop) if pre.crop else (height, width)
    if pre.resize:
        ratio = pre.resize / min(image.size)
        image = image.resize((max(crop_w, round(image.size[0] * ratio)), max(crop_h, round(image.size[1] * ratio))),
                             Image.BILINEAR)
        left, top = (image.size[0] - crop_w) // 2, (image.size[1] - crop_h) // 2
        image = image.crop((left, top, left + crop_w, top + crop_h))
    else:
        image = image.resize((crop_w, crop_h), Image.BILINEAR)
    if (crop_h, crop_w) != (height, width):
        image = image.resize((width, height), Image.BILINEAR)
    x = np.asarray(image, dtype=np.float32) / pre.scale
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    x = x[None]
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if layout == "nchw" else x)


def _image_loader(path: Path, inputs: Sequence[Mapping[str, Any]], pre: Preprocess) -> Callable[[], Feed]:
    layout, h, w, name = _image_layout(inputs, str(path.parent))

    def load() -> Feed:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                return {name: prepare_image(img, pre, h, w, layout)}
        except (UnidentifiedImageError, OSError) as err:
            raise KilnError(f"--calibration {path}: not a readable image ({err})") from None

    return load
