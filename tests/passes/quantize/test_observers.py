"""Activation range observers (passes/quantize/observers.py) against numpy on known distributions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from passes.quantize import observers


def _batches(x: np.ndarray, n: int = 8) -> list[np.ndarray]:
    return np.array_split(x.ravel(), n)


def _feed(observer: observers.Observer, x: np.ndarray, n: int = 8) -> observers.Observer:
    for batch in _batches(x, n):
        observer.update(batch)
    return observer


def _quantization_mse(x: np.ndarray, lo: float, hi: float) -> float:
    """Mean squared error of uint8 affine quantize/dequantize of x over [lo, hi] (numpy reference)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255
    zero = np.round(-lo / scale)
    q = np.clip(np.round(x / scale) + zero, 0, 255)
    return float(np.mean(((q - zero) * scale - x) ** 2))


@pytest.fixture(scope="module")
def heavy_tailed() -> np.ndarray:
    """Student-t with 3 degrees of freedom: most mass near 0, a few huge values."""
    return np.random.default_rng(0).standard_t(3, size=400_000).astype(np.float32)


@pytest.fixture(scope="module")
def relu_like() -> np.ndarray:
    """Rectified Gaussians with growing spread across batches (the histogram must re-bin as they arrive)."""
    rng = np.random.default_rng(1)
    parts = [np.maximum(rng.standard_normal(50_000), 0) * s for s in np.linspace(0.5, 4.0, 8)]
    return np.concatenate(parts).astype(np.float32)


def test_minmax_is_the_exact_range(heavy_tailed):
    lo, hi = _feed(observers.make("minmax"), heavy_tailed).range()
    assert (lo, hi) == (float(heavy_tailed.min()), float(heavy_tailed.max()))


@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
def test_percentile_matches_numpy_within_one_bin(heavy_tailed, p):
    observer = _feed(observers.make("percentile", p), heavy_tailed)
    lo, hi = observer.range()
    width = observer.hist.width
    # numpy interpolates between the two order statistics around the rank; in a sparse tail they can
    # sit bins apart, so the bracket is [lower - one bin, higher + one bin]
    for got, q in ((hi, p), (lo, 100 - p)):
        assert np.percentile(heavy_tailed, q, method="lower") - width <= got
        assert got <= np.percentile(heavy_tailed, q, method="higher") + width
    assert abs(hi - np.percentile(heavy_tailed, p)) <= 0.02 * (heavy_tailed.max() - heavy_tailed.min())


def test_percentile_of_a_one_signed_tensor_keeps_its_minimum(relu_like):
    observer = _feed(observers.make("percentile", 99.9), relu_like)
    lo, hi = observer.range()
    assert lo == 0.0
    assert abs(hi - np.percentile(relu_like, 99.9)) <= observer.hist.width  # a dense region: within one bin


@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_heavy_tails_are_clipped_below_the_max(heavy_tailed, method):
    lo, hi = _feed(observers.make(method), heavy_tailed).range()
    assert 0 < hi < 0.8 * heavy_tailed.max()
    assert heavy_tailed.min() * 0.8 < lo < 0


def test_mse_range_is_near_the_best_clipping_on_the_data(heavy_tailed):
    lo, hi = _feed(observers.make("mse"), heavy_tailed).range()
    got = _quantization_mse(heavy_tailed, lo, hi)
    # brute force over the same family of ranges (the observed range shrunk by a factor)
    best = min(_quantization_mse(heavy_tailed, a * heavy_tailed.min(), a * heavy_tailed.max())
               for a in np.linspace(0.01, 1.0, 300))
    assert got <= 1.05 * best
    assert got < 0.75 * _quantization_mse(heavy_tailed, heavy_tailed.min(), heavy_tailed.max())


def test_entropy_on_a_bounded_uniform_keeps_nearly_all_of_it():
    x = np.random.default_rng(2).uniform(0, 6, size=200_000).astype(np.float32)
    lo, hi = _feed(observers.make("entropy"), x).range()
    assert lo == pytest.approx(x.min(), abs=1e-3)
    assert hi > 0.9 * x.max()


def test_exact_zeros_do_not_pull_the_entropy_threshold_down(relu_like):
    """ReLU outputs are mostly exact zeros; those quantize exactly, so they must not shrink the range."""
    mixed = np.concatenate([np.zeros(3 * relu_like.size, np.float32), relu_like])
    with_zeros = _feed(observers.make("entropy"), np.random.default_rng(3).permutation(mixed)).range()
    without = _feed(observers.make("entropy"), relu_like).range()
    assert with_zeros[1] == pytest.approx(without[1], rel=0.1)


def test_histogram_rebinning_keeps_every_count(relu_like):
    hist = observers.Histogram(64)
    for batch in _batches(relu_like, 16):
        hist.update(batch)
    assert hist.total == relu_like.size
    edges = hist.edges()
    assert edges[0] <= relu_like.min() and edges[-1] >= relu_like.max()
    np.testing.assert_array_equal(hist.counts, np.histogram(relu_like, bins=edges)[0])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=300),
       st.integers(1, 5))
def test_histogram_matches_numpy_on_any_batches(values, pieces):
    x = np.asarray(values, np.float32)
    hist = observers.Histogram(32)
    for batch in np.array_split(x, pieces):
        hist.update(batch)
    assert hist.total == x.size
    if hist.width:
        assert len(hist.counts) <= 32
        assert hist.edges()[0] <= x.min() and hist.edges()[-1] >= x.max()
        np.testing.assert_array_equal(hist.counts, np.histogram(x, bins=hist.edges())[0])


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_all_zero_and_empty_inputs(method):
    observer = observers.make(method)
    assert observer.range() == (0.0, 0.0)
    observer.update(np.zeros(100, np.float32))
    assert observer.range() == (0.0, 0.0)


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown calibration method"):
        observers.make("kl")
