"""Output comparison: exact for integers, tolerances for floats, never tighter than the dtype's ulp."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from compiler.compare import compare_arrays, compare_outputs


def test_integers_are_exact():
    a = np.arange(6, dtype=np.int64)
    assert compare_arrays(a, a.copy(), 1e-4, 1e-5) is None
    b = a.copy()
    b[3] += 1
    assert compare_arrays(a, b, 1.0, 1.0) == "1 of 6 elements differ"


def test_float32_uses_the_given_tolerance():
    a = np.ones(4, np.float32)
    assert compare_arrays(a, a * (1 + 5e-5), 1e-4, 0.0) is None
    assert "max abs error" in compare_arrays(a, a * (1 + 5e-4), 1e-4, 0.0)


def test_float16_allows_one_rounding_step_but_not_more():
    a = np.array([1.0, 2.0, 0.5], np.float16)
    one_step = np.nextafter(a, np.float16(10))
    assert compare_arrays(a, one_step, 1e-4, 1e-5) is None
    assert compare_arrays(a, (a * np.float16(1.05)).astype(np.float16), 1e-4, 1e-5) is not None


def test_bfloat16_and_nan_positions():
    a = np.array([1.0, np.nan], ml_dtypes.bfloat16)
    assert compare_arrays(a, a.copy(), 1e-4, 1e-5) is None
    b = np.array([np.nan, 1.0], ml_dtypes.bfloat16)
    assert "NaN" in compare_arrays(a, b, 1e-4, 1e-5)


def test_shape_dtype_and_names():
    a = np.zeros((2, 3), np.float32)
    assert "shape" in compare_arrays(a, a.reshape(3, 2), 1e-4, 1e-5)
    assert "dtype" in compare_arrays(a, a.astype(np.float64), 1e-4, 1e-5)
    assert compare_outputs({"y": a}, {"z": a}, 1e-4, 1e-5) == ["output names ['z'] != ['y']"]
