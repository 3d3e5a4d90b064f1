"""A deterministic set of a few hundred 224 x 224 photos for calibrating and evaluating image models.

The sources are the photos bundled with scikit-image (``skimage.data``) and
scikit-learn (``load_sample_images``); each is cut into ``VARIANTS`` crops of
random scale and position, some mirrored, resized to 224 x 224 (seeded, so
every run sees the same pixels). The crops are shuffled once (seeded) and
split: the calibration split is taken from the front of that order, the
evaluation split from the back, so the two never share a crop.

Arrays are preprocessed as EfficientNet-Lite0 expects (``tests.model_zoo.photo_batch``):
``(x - 127) / 128``, NCHW float32. ``write_pngs`` writes the raw crops as PNG
files; ``PREPROCESS`` is the ``--calibration-preprocess`` spec that turns them
back into exactly the arrays ``calibration`` returns.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

SIZE = 224
#: crops cut from each source photo
VARIANTS = 24
#: skimage.data photos used (grayscale ones are replicated to RGB)
SKIMAGE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "camera", "coins", "clock", "brick", "grass",
                  "gravel", "hubble_deep_field", "immunohistochemistry")
#: ``--calibration-preprocess`` reproducing the arrays from the PNGs: x / 128 - 127 / 128
PREPROCESS = "raw,scale=128,mean=0.9921875:0.9921875:0.9921875"


def _sources() -> list[np.ndarray]:
    """Every source photo as uint8 HxWx3."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = [getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS]
    photos += list(load_sample_images().images)
    out = []
    for img in photos:
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        out.append(np.ascontiguousarray(img[:, :, :3].astype(np.uint8)))
    return out


def _crop(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (35-100% of the short side), maybe mirrored, resized to SIZE."""
    from PIL import Image

    h, w = img.shape[:2]
    side = int(min(h, w) * rng.uniform(0.35, 1.0))
    y = int(rng.integers(0, h - side + 1))
    x = int(rng.integers(0, w - side + 1))
    piece = img[y : y + side, x : x + side]
    if rng.random() < 0.5:
        piece = piece[:, ::-1]
    resized = Image.fromarray(np.ascontiguousarray(piece)).resize((SIZE, SIZE), Image.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


@functools.lru_cache(maxsize=1)
def crops() -> np.ndarray:
    """Every crop, shuffled, as uint8 [N, 224, 224, 3] (N = sources x VARIANTS)."""
    out = []
    for index, img in enumerate(_sources()):
        rng = np.random.default_rng(1000 + index)
        out.extend(_crop(img, rng) for _ in range(VARIANTS))
    order = np.random.default_rng(0).permutation(len(out))
    stacked = np.stack([out[i] for i in order])
    stacked.flags.writeable = False
    return stacked


def count() -> int:
    return len(crops())


def preprocess(pixels: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] scaled (x - 127) / 128."""
    x = (pixels.astype(np.float32) - 127.0) / 128.0
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _split_pixels(split: str, n: int) -> np.ndarray:
    total = count()
    if n > total // 2:
        raise ValueError(f"at most {total // 2} images per split, asked for {n}")
    if split == "calibration":
        return crops()[:n]
    if split == "evaluation":
        return crops()[total - n :]
    raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}")


def calibration(n: int = 64) -> np.ndarray:
    """The first ``n`` calibration images, float32 [n, 3, 224, 224]."""
    return preprocess(_split_pixels("calibration", n))


def evaluation(n: int = 100) -> np.ndarray:
    """``n`` evaluation images (disjoint from every calibration image), float32 [n, 3, 224, 224]."""
    return preprocess(_split_pixels("evaluation", n))


def feeds(images: np.ndarray, name: str = "image", batch: int = 1) -> list[dict[str, np.ndarray]]:
    """``images`` as a list of feeds of ``batch`` images each (for ``CalibrationSet.from_feeds``)."""
    return [{name: images[i : i + batch]} for i in range(0, len(images), batch)]


def write_pngs(folder: str | Path, n: int, split: str = "calibration") -> list[Path]:
    """Write ``n`` crops of ``split`` as PNG files into ``folder``; read them back with ``PREPROCESS``."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, pixels in enumerate(_split_pixels(split, n)):
        path = folder / f"{split}_{i:04d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def write_npz(path: str | Path, n: int, split: str = "calibration", name: str = "image") -> Path:
    """Write ``n`` preprocessed images of ``split`` as one .npz array ``name`` [n, 3, 224, 224]."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = calibration(n) if split == "calibration" else evaluation(n)
    np.savez(path, **{name: images})
    return path
