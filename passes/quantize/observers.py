"""Activation range observers: fed batch by batch, each returns the (lo, hi) to quantize a tensor with.

Memory stays bounded however many batches stream through: ``minmax`` keeps two
numbers, the others a fixed-width histogram (``Histogram``) whose bins double
in width when the data outgrows them.

- ``minmax``: the observed min and max.
- ``percentile``: the ``100 - p`` and ``p`` percentiles (a one-signed tensor keeps 0 as its other end).
- ``entropy``: the clipping threshold whose quantized distribution is closest
  to the observed one in KL divergence (TensorRT's calibration), searched over
  the histogram of |x| (of x itself when x never goes below zero).
- ``mse``: the range, shrunk from the observed one, minimizing the expected
  squared error of 8-bit affine quantization over the histogram.
"""

from __future__ import annotations

import numpy as np

#: histogram resolution: the bin count never exceeds this
BINS = 2048


class Histogram:
    """Counts of values in bins of width ``width`` anchored at zero: bin k holds [k*w, (k+1)*w).

    Anchoring at zero makes re-binning exact: doubling the width merges bins
    2j and 2j+1 into j, so no count is ever split or smeared. The first
    nonzero batch sets the width so its range (widened to include 0) fills
    the bins; later batches outside it double the width until they fit.
    """

    def __init__(self, bins: int = BINS) -> None:
        self.max_bins = bins
        self.width = 0.0  # 0 until a nonzero value arrives
        self.start = 0  # bin index of counts[0]
        self.counts = np.zeros(0, dtype=np.int64)
        self.lo = np.inf
        self.hi = -np.inf
        self._zeros = 0  # zeros seen before the width was known
        self.exact_zeros = 0  # values exactly 0 (ReLU's), which every range represents exactly

    @property
    def total(self) -> int:
        return int(self.counts.sum()) + self._zeros

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32).ravel()
        if not np.all(np.isfinite(x)):
            x = x[np.isfinite(x)]
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self.exact_zeros += int(x.size - np.count_nonzero(x))
        if self.width == 0.0:
            if lo == 0.0 and hi == 0.0:
                self._zeros += x.size
                return
            self.width = (max(hi, 0.0) - min(lo, 0.0)) / (self.max_bins - 2)
            self.start = int(np.floor(min(lo, 0.0) / self.width))
            self.counts = np.zeros(1, dtype=np.int64)
        # coarsen first while the span in bins is too wide (bin indices of far values would overflow int64)
        span_lo = min(lo, 0.0, self.start * self.width)
        span_hi = max(hi, 0.0, (self.start + len(self.counts)) * self.width)
        while (span_hi - span_lo) / self.width > 2 * self.max_bins:
            self._coarsen()
        self._cover(int(self._bins(np.float32([lo]))[0]), int(self._bins(np.float32([hi]))[0]))
        idx = self._bins(x)
        idx -= self.start
        np.clip(idx, 0, len(self.counts) - 1, out=idx)  # float rounding at the edges
        self.counts += np.bincount(idx, minlength=len(self.counts))
        if self._zeros:
            self.counts[-self.start] += self._zeros
            self._zeros = 0

    def _bins(self, x: np.ndarray) -> np.ndarray:
        """Bin index of each value, consistent with ``edges()`` (k*w <= x < (k+1)*w in float64)."""
        x = x.astype(np.float64)  # float32 would overflow 1/width for tiny widths
        idx = np.floor(x / self.width)
        idx += x >= (idx + 1) * self.width  # the division can land one bin off at an edge
        idx -= x < idx * self.width
        return idx.astype(np.int64)

    def _cover(self, first: int, last: int) -> None:
        """Grow (coarsening when needed) so bins ``first``..``last`` and bin 0 exist."""
        first, last = min(first, 0), max(last, 0)
        lo, hi = min(first, self.start), max(last, self.start + len(self.counts) - 1)
        while hi - lo + 1 > self.max_bins:
            self._coarsen()
            first, last = first // 2, last // 2
            lo, hi = min(first, self.start), max(last, self.start + len(self.counts) - 1)
        if lo == self.start and hi == self.start + len(self.counts) - 1:
            return
        grown = np.zeros(hi - lo + 1, dtype=np.int64)
        grown[self.start - lo : self.start - lo + len(self.counts)] = self.counts
        self.start, self.counts = lo, grown

    def _coarsen(self) -> None:
        """Double the bin width: bin k goes to k // 2 (floor division, so negative bins merge exactly too)."""
        new_start = self.start // 2
        idx = (np.arange(len(self.counts)) + self.start) // 2 - new_start
        self.counts = np.bincount(idx, weights=self.counts, minlength=int(idx[-1]) + 1).astype(np.int64)
        self.start = new_start
        self.width *= 2.0

    def edges(self) -> np.ndarray:
        return (np.arange(len(self.counts) + 1) + self.start) * self.width

    def centers(self) -> np.ndarray:
        return (np.arange(len(self.counts)) + self.start + 0.5) * self.width


class Observer:
    """Feed with ``update(array)`` per batch; ``range()`` gives (lo, hi) as floats."""

    def update(self, x: np.ndarray) -> None:
        raise NotImplementedError

    def range(self) -> tuple[float, float]:
        raise NotImplementedError


class MinMax(Observer):
    def __init__(self) -> None:
        self.lo, self.hi = np.inf, -np.inf

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.size:
            self.lo = min(self.lo, float(np.nanmin(x)))
            self.hi = max(self.hi, float(np.nanmax(x)))

    def range(self) -> tuple[float, float]:
        if self.lo > self.hi:
            return 0.0, 0.0
        return self.lo, self.hi


class _HistogramObserver(Observer):
    def __init__(self, bins: int = BINS) -> None:
        self.hist = Histogram(bins)

    def update(self, x: np.ndarray) -> None:
        self.hist.update(x)

    def _empty(self) -> bool:
        return self.hist.total == 0 or self.hist.width == 0.0


class Percentile(_HistogramObserver):
    """The (100 - p)th and pth percentiles, linear inside the bin the rank falls in."""

    def __init__(self, percentile: float = 99.999, bins: int = BINS) -> None:
        super().__init__(bins)
        self.p = percentile

    def range(self) -> tuple[float, float]:
        h = self.hist
        if self._empty():
            return 0.0, 0.0
        lo = self._quantile(1.0 - self.p / 100.0) if h.lo < 0 else h.lo
        hi = self._quantile(self.p / 100.0) if h.hi > 0 else h.hi
        return max(lo, h.lo), min(hi, h.hi)

    def _quantile(self, q: float) -> float:
        h = self.hist
        cum = np.cumsum(h.counts)
        rank = q * (cum[-1] - 1)  # numpy's default ("linear") places rank r at sorted[r]
        k = int(np.searchsorted(cum, rank, side="right"))
        k = min(k, len(cum) - 1)
        before = cum[k - 1] if k else 0
        frac = (rank - before + 0.5) / max(h.counts[k], 1)
        return float((h.start + k + min(max(frac, 0.0), 1.0)) * h.width)


class Entropy(_HistogramObserver):
    """KL-divergence threshold search over the magnitude histogram (TensorRT's entropy calibration)."""

    def range(self) -> tuple[float, float]:
        h = self.hist
        if self._empty():
            return 0.0, 0.0
        one_sided = h.lo >= 0 or h.hi <= 0
        counts, width = _magnitudes(h)
        counts[0] -= h.exact_zeros  # zeros quantize exactly whatever the threshold: they must not sway it
        levels = 255 if one_sided else 127  # quantization steps available for |x| (uint8, or int8 per side)
        threshold = _kl_threshold(counts.astype(np.float64), width, levels)
        if h.hi <= 0:
            return max(-threshold, h.lo), 0.0
        return max(-threshold, h.lo), min(threshold, h.hi)


def _magnitudes(h: Histogram) -> tuple[np.ndarray, float]:
    """The histogram of |x|: bins [j*w, (j+1)*w) for j >= 0 (negative bin -1-j folds onto j)."""
    idx = np.arange(len(h.counts)) + h.start
    mag = np.where(idx >= 0, idx, -1 - idx)
    return np.bincount(mag, weights=h.counts, minlength=int(mag.max()) + 1), h.width


def _kl_threshold(counts: np.ndarray, width: float, levels: int) -> float:
    """The |x| threshold (a bin edge) minimizing KL(P || Q), P the clipped histogram, Q its quantized copy."""
    n = len(counts)
    if n <= levels:
        return n * width
    best, best_i = np.inf, n
    for i in range(levels, n + 1):
        p = counts[:i].copy()
        p[-1] += counts[i:].sum()  # clipped values pile up in the last bin
        nonzero = counts[:i] > 0
        # merge the i bins into `levels` groups, spread each group's mass over its nonzero bins
        group = (np.arange(i) * levels) // i
        mass = np.bincount(group, weights=counts[:i], minlength=levels)
        used = np.bincount(group, weights=nonzero, minlength=levels)
        q = np.where(nonzero, mass[group] / np.maximum(used[group], 1), 0.0)
        divergence = _kl(p, q)
        if divergence < best:
            best, best_i = divergence, i
    return best_i * width


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p = p / p.sum()
    qs = q.sum()
    if qs == 0:
        return np.inf
    q = q / qs
    mask = p > 0
    if np.any(q[mask] == 0):
        return np.inf
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


class Mse(_HistogramObserver):
    """The range [a*lo, a*hi] (a in (0, 1], geometric grid) with the least expected 8-bit quantization error.

    Values inside the range cost the rounding noise of a uniform step (step**2 / 12,
    exact enough once the step is finer than the histogram bins and unbiased when
    it is not); values outside cost their squared distance to the clipped end.
    """

    GRID = 240

    def range(self) -> tuple[float, float]:
        h = self.hist
        if self._empty():
            return 0.0, 0.0
        lo, hi = min(h.lo, 0.0), max(h.hi, 0.0)
        x, w = h.centers(), h.counts.astype(np.float64)
        best, best_a = np.inf, 1.0
        for a in np.geomspace(1e-3, 1.0, self.GRID):
            err = expected_error(x, w, a * lo, a * hi)
            if err < best:
                best, best_a = err, a
        return max(best_a * lo, h.lo), min(best_a * hi, h.hi)


def expected_error(x: np.ndarray, weights: np.ndarray, lo: float, hi: float, levels: int = 255) -> float:
    """Summed squared error of quantizing ``x`` (multiplicities ``weights``) to ``levels`` steps over [lo, hi]."""
    step = (hi - lo) / levels
    if step <= 0:
        return float(np.dot(weights, x * x))
    clipped = np.clip(x, lo, hi)
    inside = (x >= lo) & (x <= hi)
    err = np.where(inside, step * step / 12.0, (x - clipped) ** 2)
    return float(np.dot(weights, err))


def make(method: str, percentile: float = 99.999) -> Observer:
    """A fresh observer for calibration ``method`` (minmax, percentile, entropy, mse)."""
    if method == "minmax":
        return MinMax()
    if method == "percentile":
        return Percentile(percentile)
    if method == "entropy":
        return Entropy()
    if method == "mse":
        return Mse()
    raise ValueError(f"unknown calibration method {method!r}")
