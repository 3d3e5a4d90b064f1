"""Shared fixtures: tiny checkpoints (built once per session) and llama.cpp references.

llama-cpp-python is part of the test extra; these tests import it unconditionally
(a missing install is a failure, not a skip).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import pytest

from tests.gguf import tiny


@pytest.fixture(scope="session")
def llama_cpp():
    import llama_cpp

    return llama_cpp


@pytest.fixture(scope="session")
def ggml_quantize(llama_cpp):
    """llama.cpp's own ggml_quantize_chunk (from the library llama-cpp-python ships) as
    (x float32 (rows, cols), ggml type id, imatrix or None) -> (rows, row_bytes) uint8."""
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]

    def quantize(x: np.ndarray, type_id: int, imatrix: np.ndarray | None = None) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        rows, cols = x.shape
        out = np.zeros(rows * lib.ggml_row_size(type_id, cols), np.uint8)
        im = None if imatrix is None else np.ascontiguousarray(imatrix, np.float32)
        lib.ggml_quantize_chunk(type_id, x.ctypes.data, out.ctypes.data, 0, rows, cols,
                                None if im is None else im.ctypes.data)
        return out.reshape(rows, -1)

    return quantize


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Tiny 64-wide checkpoints (fast; rows too short for K-quants, so those fall back)."""
    root = tmp_path_factory.mktemp("ckpt")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            folder = root / arch
            built[arch] = tiny.make_gpt2(folder) if arch == "gpt2" else tiny.make_llama(folder, arch)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def wide_checkpoints(tmp_path_factory):
    """256-wide checkpoints with 8 layers for the LLaMA family, so K-quant blocks fit and
    llama.cpp's per-layer mix rules (first/last eighth, every third layer) all apply."""
    root = tmp_path_factory.mktemp("wide")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            folder = root / arch
            if arch == "gpt2":
                built[arch] = tiny.make_gpt2(folder, n_embd=256, n_layer=2)
            else:
                built[arch] = tiny.make_llama(folder, arch, hidden_size=256, intermediate_size=256,
                                              num_hidden_layers=8, num_attention_heads=4,
                                              num_key_value_heads=2 if arch == "qwen2" else 1)
        return built[arch]

    return get
