"""Compare two runs' outputs: exact for integers, bools and strings; tolerances for floats."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def compare_arrays(expected: np.ndarray, actual: np.ndarray, rtol: float, atol: float) -> str | None:
    """None when equal within tolerance, else a short reason."""
    expected = np.asarray(expected)
    actual = np.asarray(actual)
    if expected.shape != actual.shape:
        return f"shape {list(actual.shape)} != {list(expected.shape)}"
    if expected.dtype != actual.dtype:
        return f"dtype {actual.dtype} != {expected.dtype}"
    if expected.size == 0:
        return None
    if expected.dtype.kind in "fc" or expected.dtype.name in ("bfloat16",) or expected.dtype.name.startswith("float"):
        # Never tighter than a few units in the last place of the dtype: a
        # float16 result that moved by one rounding step is equal.
        eps = _machine_eps(expected.dtype)
        rtol, atol = max(rtol, 4 * eps), max(atol, eps)
        e = expected.astype(np.complex128 if expected.dtype.kind == "c" else np.float64)
        a = actual.astype(e.dtype)
        e_nan, a_nan = np.isnan(e), np.isnan(a)
        if not np.array_equal(e_nan, a_nan):
            return f"NaN at {int(np.sum(e_nan != a_nan))} differing positions"
        e_inf, a_inf = np.isinf(e), np.isinf(a)
        if not np.array_equal(e_inf, a_inf) or not np.array_equal(e[e_inf], a[a_inf]):
            return "infinities differ"
        finite = ~(e_nan | e_inf)
        diff = np.abs(e[finite] - a[finite])
        bound = atol + rtol * np.abs(e[finite])
        if diff.size and np.any(diff > bound):
            worst = int(np.argmax(diff - bound))
            return f"max abs error {float(diff.max()):.3g} (at worst element {e[finite][worst]!r} vs {a[finite][worst]!r})"
        return None
    if not np.array_equal(expected, actual):
        return f"{int(np.sum(expected != actual))} of {expected.size} elements differ"
    return None


def _machine_eps(dtype: np.dtype) -> float:
    try:
        import ml_dtypes

        return float(ml_dtypes.finfo(dtype).eps)
    except Exception:
        return 0.0


def compare_outputs(
    expected: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray], rtol: float, atol: float
) -> list[str]:
    """Mismatch reasons per output name (empty when every output matches)."""
    problems = []
    if list(expected) != list(actual):
        problems.append(f"output names {list(actual)} != {list(expected)}")
    for name, value in expected.items():
        if name not in actual:
            continue
        reason = compare_arrays(value, actual[name], rtol, atol)
        if reason:
            problems.append(f"{name}: {reason}")
    return problems


def max_abs_error(expected: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray]) -> float:
    worst = 0.0
    for name, e in expected.items():
        e = np.asarray(e)
        a = np.asarray(actual.get(name))
        if e.dtype.kind in "fiu" and e.shape == a.shape and e.size:
            with np.errstate(invalid="ignore", over="ignore"):
                d = np.abs(e.astype(np.float64) - a.astype(np.float64))
            d = d[np.isfinite(d)]
            if d.size:
                worst = max(worst, float(d.max()))
    return worst


def relative_l2_error(expected: np.ndarray, actual: np.ndarray) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (0 when both are zero, inf on shape mismatch)."""
    e = np.asarray(expected, np.float64)
    a = np.asarray(actual, np.float64)
    if e.shape != a.shape:
        return float("inf")
    norm = float(np.linalg.norm(e))
    diff = float(np.linalg.norm(a - e))
    return diff / norm if norm else (0.0 if diff == 0 else float("inf"))


def compare_outputs_relative(
    expected: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray], limit: float
) -> list[str]:
    """Problems where an output's relative L2 error exceeds ``limit`` (non-float outputs must be equal)."""
    problems = []
    for name, e in expected.items():
        if name not in actual:
            problems.append(f"output {name!r} is missing")
            continue
        e_arr, a_arr = np.asarray(e), np.asarray(actual[name])
        if e_arr.dtype.kind not in "fc":
            if e_arr.shape != a_arr.shape or not np.array_equal(e_arr, a_arr):
                problems.append(f"output {name!r} differs")
            continue
        if not np.all(np.isfinite(a_arr) == np.isfinite(e_arr)):
            problems.append(f"output {name!r}: non-finite values differ")
            continue
        err = relative_l2_error(np.nan_to_num(e_arr), np.nan_to_num(a_arr))
        if err > limit:
            problems.append(f"output {name!r}: relative L2 error {err:.3g} > {limit:g}")
    return problems
