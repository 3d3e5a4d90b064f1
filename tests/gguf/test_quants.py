"""kiln's quantizers against llama.cpp's own ggml_quantize_chunk, byte for byte."""

from __future__ import annotations

import numpy as np
import pytest

from targets.gguf import quants as Q

TYPES = [name for name in Q.TYPES if name != "F32"]
QUANTIZED = [name for name, t in Q.TYPES.items() if t.quantized]


def _data(kind: str, rng: np.random.Generator, shape=(12, 1024)) -> np.ndarray:
    """Distributions that reach the reference's corner cases: ties, zero blocks, signed zeros,
    denormal-scale blocks, constant blocks, heavy tails, sparse rows."""
    if kind == "normal":
        x = rng.standard_normal(shape)
    elif kind == "tiny":
        x = rng.standard_normal(shape) * 1e-7
    elif kind == "grid":  # many exact ties between candidate scales
        x = rng.integers(-6, 7, shape) * 0.25
    elif kind == "heavy":
        x = rng.laplace(size=shape) * 50
    elif kind == "sparse":
        x = rng.standard_normal(shape) * (rng.random(shape) < 0.05)
    elif kind == "zeros":  # +0/-0 mixes and a few nonzeros: the sign of stored zeros matters
        x = np.where(rng.random(shape) < 0.5, 0.0, -0.0) + (rng.random(shape) < 0.01) * rng.standard_normal(shape)
    elif kind == "positive":
        x = np.abs(rng.standard_normal(shape)) + 2
    else:
        raise AssertionError(kind)
    x = x.astype(np.float32)
    x[0, :256] = 1.5  # a constant super-block
    x[1, 32:64] = 0.0
    return x


KINDS = ["normal", "tiny", "grid", "heavy", "sparse", "zeros", "positive"]


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_llama_cpp(name, kind, ggml_quantize):
    x = _data(kind, np.random.default_rng(KINDS.index(kind)))
    t = Q.TYPES[name]
    ours = Q.quantize(x, name)
    theirs = ggml_quantize(x, t.id)
    assert ours.shape == theirs.shape
    bad = np.flatnonzero((ours != theirs).any(axis=1))
    assert bad.size == 0, f"{name}/{kind}: rows {bad[:5]} differ"


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("kind", ["normal", "grid", "sparse", "zeros"])
def test_matches_llama_cpp_with_importance_matrix(name, kind, ggml_quantize):
    rng = np.random.default_rng(100 + KINDS.index(kind))
    x = _data(kind, rng)
    imatrix = (rng.random(x.shape[1]) * 10 + 1e-3).astype(np.float32)
    imatrix[::7] = 0  # columns that never fired
    t = Q.TYPES[name]
    ours = Q.quantize(x, name, imatrix)
    theirs = ggml_quantize(x, t.id, imatrix)
    bad = np.flatnonzero((ours != theirs).any(axis=1))
    assert bad.size == 0, f"{name}/{kind}: rows {bad[:5]} differ with an imatrix"


def test_many_rows_use_the_same_path(ggml_quantize):
    """Chunking and threads split rows; results must not depend on where the splits fall."""
    x = _data("normal", np.random.default_rng(7), shape=(1100, 512))  # several chunks of every type
    for name in ("Q8_0", "Q4_0", "Q5_1", "Q4_K", "Q6_K"):
        rows = x if name.endswith("_0") or name.endswith("_1") else x[:300]
        assert np.array_equal(Q.quantize(rows, name), ggml_quantize(rows, Q.TYPES[name].id)), name


@pytest.mark.parametrize("name", QUANTIZED)
def test_dequantize_agrees_with_the_gguf_package(name):
    """Our dequantizers against gguf-py's independent ones, on llama.cpp-format blocks."""
    import gguf

    x = _data("normal", np.random.default_rng(3))
    blocks = Q.quantize(x, name)
    ours = Q.dequantize(blocks, name, x.shape)
    theirs = gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType, name))
    np.testing.assert_array_equal(ours, theirs.reshape(x.shape).astype(np.float32))


def test_gguf_package_quantizers_agree_where_it_has_them():
    import gguf

    x = _data("heavy", np.random.default_rng(5))
    for name in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        theirs = gguf.quants.quantize(x, getattr(gguf.GGMLQuantizationType, name))
        assert np.array_equal(Q.quantize(x, name), theirs), name


def test_rows_that_are_not_whole_blocks_are_refused():
    with pytest.raises(Exception, match="not a whole number of Q4_K blocks"):
        Q.quantize(np.zeros((2, 100), np.float32), "Q4_K")
