"""Shared fixtures: a tiny LLaMA checkpoint and its packages, a CNN and MiniLM packaged with --emit mlc.

Each package is compiled once per session (TVM compiles take seconds).
TVM, torch and transformers are part of the test extra: a missing install is
a failure, not a skip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import compiler
from tests.gguf import tiny

ROOT = Path(__file__).resolve().parents[3]
CNN = ROOT / "examples" / "models" / "tiny_cnn.onnx"


@pytest.fixture(scope="session")
def llama_checkpoint(tmp_path_factory) -> Path:
    """A 2-layer LlamaForCausalLM (hidden 64, 4 heads, 2 KV heads, random weights) + a byte-level BPE tokenizer."""
    return tiny.make_llama(tmp_path_factory.mktemp("ckpt") / "llama")


@pytest.fixture(scope="session")
def llm_package(tmp_path_factory, llama_checkpoint):
    """mode -> the compiled package (an Artifact), built on first use."""
    root = tmp_path_factory.mktemp("mlc-llm")
    built: dict[str, compiler.api.Artifact] = {}

    def get(mode: str) -> compiler.api.Artifact:
        if mode not in built:
            built[mode] = compiler.compile(str(llama_checkpoint), emit="mlc", quantize=mode, output=root / mode)
        return built[mode]

    return get


@pytest.fixture(scope="session")
def cnn_package(tmp_path_factory):
    return compiler.compile(str(CNN), emit="mlc", output=tmp_path_factory.mktemp("mlc-cnn") / "pkg")


@pytest.fixture(scope="session")
def minilm(tmp_path_factory):
    """(all-MiniLM-L6-v2 from tests/model_zoo.py as .onnx, batch and sequence symbolic; its package)."""
    from tests import model_zoo

    folder = tmp_path_factory.mktemp("mlc-minilm")
    path = model_zoo.minilm(folder)
    return path, compiler.compile(str(path), emit="mlc", output=folder / "pkg")


def hf_greedy(folder: Path, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """transformers' greedy continuation (full forward each step, float32) and the logits each token came from."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = list(prompt)
    rows = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1].numpy()
            rows.append(logits)
            ids.append(int(logits.argmax()))
    return ids[len(prompt):], np.stack(rows)


def hf_logits(folder: Path, tokens: list[int], dequantize=None) -> np.ndarray:
    """transformers' float32 logits for every position of ``tokens``; ``dequantize(weight) -> weight``
    replaces each 2-D weight first (to compare a quantized package with the same weights in float)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        if dequantize is not None:
            for param in model.parameters():
                if param.ndim == 2:
                    param.copy_(torch.from_numpy(dequantize(param.numpy())))
        return model(torch.tensor([tokens])).logits[0].numpy()
