"""Conformance: every model in the onnx wheel's test data and every node case,
compiled with ``--emit onnx -O1``, must compute what the original computes in
onnxruntime (fp32 rtol 1e-4, atol 1e-5; exact for integers) in >= 99 % of the
cases onnxruntime runs on the original. The same bar holds at -O3 (every
fusion, onnxruntime contrib ops on).
"""

from __future__ import annotations

import collections
import time

import pytest

import compiler
from compiler.errors import KilnError
from tests import corpus

RTOL, ATOL = 1e-4, 1e-5
REQUIRED_PASS_RATE = 0.99


def _check_case(case: corpus.Case, out_dir, opt_level: int) -> tuple[str, str]:
    """('pass'|'fail'|'excluded', reason)."""
    inputs = case.inputs if case.inputs or case.group != "light" else corpus.random_inputs_for(case.model)
    try:
        expected = corpus.ort_run(case.model, inputs)
    except Exception as err:
        return "excluded", f"onnxruntime cannot run the original: {str(err).splitlines()[0][:120]}"
    try:
        again = corpus.ort_run(case.model, inputs)
    except Exception as err:  # pragma: no cover - ran once already
        return "excluded", f"onnxruntime failed on a second run: {err}"
    if corpus.outputs_equal(expected, again, 0.0, 0.0) is not None:
        return "excluded", "non-deterministic: two runs of the original differ"
    try:
        art = compiler.compile(case.model, target="x86_64-linux-gnu", emit="onnx", opt_level=opt_level, output=out_dir)
        actual = art.run(inputs)
    except KilnError as err:
        return "fail", f"{type(err).__name__}: {err}"
    except Exception as err:
        return "fail", f"crash {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    reason = corpus.outputs_equal(expected, actual, RTOL, ATOL)
    return ("fail", reason) if reason else ("pass", "")


@pytest.mark.slow
@pytest.mark.parametrize("opt_level", [1, 3])
def test_corpus_round_trip(tmp_path, opt_level):
    start = time.perf_counter()
    tally: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failures: list[str] = []
    for i, case in enumerate(corpus.all_cases()):
        status, reason = _check_case(case, tmp_path / f"a{i}", opt_level)
        tally[case.group][status] += 1
        if status == "excluded" and reason.startswith("non-deterministic"):
            tally[case.group]["random"] += 1
        if status == "fail":
            failures.append(f"{case.group}/{case.name}: {reason}")
    ran = sum(t["pass"] + t["fail"] for t in tally.values())
    passed = sum(t["pass"] for t in tally.values())
    rate = passed / ran if ran else 0.0
    print(f"\ncorpus at -O{opt_level}: {passed}/{ran} pass ({rate:.2%}) in {time.perf_counter() - start:.0f} s")
    for group, t in sorted(tally.items()):
        print(f"  {group:<18} pass {t['pass']:>5}  fail {t['fail']:>3}  excluded {t['excluded']:>4}"
              f" (onnxruntime cannot run the original: {t['excluded'] - t['random']}, non-deterministic: {t['random']})")
    for line in failures:
        print(f"  FAIL {line}")
    assert ran > 1600, f"only {ran} cases ran in onnxruntime; the corpus did not load"
    assert rate >= REQUIRED_PASS_RATE, f"pass rate {rate:.2%} < {REQUIRED_PASS_RATE:.0%}: " + "; ".join(failures[:20])
