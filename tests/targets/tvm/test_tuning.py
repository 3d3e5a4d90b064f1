"""MetaSchedule tuning: a bounded budget, records kept in --tuning-db and reused (a second compile with
the same database searches nothing), the tuned artifact still matches onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compiler.errors import KilnError

from .helpers import assert_matches, kiln, kiln_run, ort_run

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "models" / "tiny_cnn.onnx"


def _compile(tmp_path: Path, out: str, db: Path, trials: int) -> dict:
    proc = kiln("compile", str(EXAMPLE), "--emit", "tvm", "--tune-trials", str(trials), "--tuning-db", str(db),
                "-o", str(tmp_path / out))
    assert proc.returncode == 0, proc.stderr
    return json.loads((tmp_path / out / "manifest.json").read_text())


@pytest.mark.slow
def test_records_are_reused_across_compiles(tmp_path):
    db = tmp_path / "db"
    first = _compile(tmp_path, "first", db, trials=8)["backend"]["tuning"]
    assert first["tasks_searched"] == 1 and first["trials"] == 8  # 8 trials buy one task, fully searched
    records = (db / "database_tuning_record.json").read_text().splitlines()
    assert len(records) >= 1
    second = _compile(tmp_path, "second", db, trials=8)
    tuning = second["backend"]["tuning"]
    assert tuning["tasks_searched"] == 0 and tuning["trials"] == 0 and tuning["tasks_reused"] == 1
    assert (db / "database_tuning_record.json").read_text().splitlines() == records  # nothing new measured
    assert second["verification"]["passed"]
    import numpy as np

    inputs = {"image": np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    assert_matches(ort_run(EXAMPLE, inputs), kiln_run(tmp_path / "second", inputs, tmp_path))


def test_tuning_a_target_this_host_cannot_run_is_refused(tmp_path):
    import compiler

    with pytest.raises(KilnError, match="--tune-trials measures kernels on this machine"):
        compiler.compile(str(EXAMPLE), target="aarch64-linux-gnu", emit="tvm", output=tmp_path / "a", tune_trials=8)


def test_a_tuned_record_is_applied_only_when_it_measured_faster_than_the_default(tmp_path):
    """kiln's default schedule is measured and committed next to the search's records, so the schedule the
    build applies (the database's best) is a tuned one only when that ran faster than the default."""
    from tvm import s_tir, te
    from tvm.s_tir import meta_schedule as ms

    from targets.tvm import tune
    from targets.tvm.build import make_target
    from targets.triple import resolve_target

    a = te.placeholder((64, 128), name="a")
    b = te.placeholder((128, 96), name="b")
    k = te.reduce_axis((0, 128), name="k")
    c = te.compute((64, 96), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="c")
    mod = tvm_module(te.create_prim_func([a, b, c]))
    target = make_target(resolve_target("x86_64-linux-gnu"))
    database = ms.database.JSONDatabase(work_dir=str(tmp_path), module_equality="structural")
    builder = ms.builder.LocalBuilder(f_build=tune._build_candidate, timeout_sec=tune.BUILD_TIMEOUT_S)
    runner = ms.runner.LocalRunner()

    # a "tuned" candidate as the search would commit it: here the unscheduled kernel (serial, scalar)
    naive = s_tir.Schedule(mod)
    args_info = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
    built = builder.build([ms.builder.BuilderInput(naive.mod, target)])[0]
    assert not built.error_msg, built.error_msg
    ran = runner.run([ms.runner.RunnerInput(built.artifact_path, "cpu", args_info)])[0].result()
    assert not ran.error_msg, ran.error_msg
    workload = database.commit_workload(mod)
    database.commit_tuning_record(ms.database.TuningRecord(naive.trace, workload, [float(s) for s in ran.run_secs],
                                                           target, args_info))

    assert tune._commit_default(database, mod, target, builder, runner)
    records = database.get_all_tuning_records()
    assert len(records) == 2
    default_trace = str(tune._default_schedule(mod, target).trace)
    by_trace = {str(r.trace): _mean(r.run_secs) for r in records}
    assert default_trace in by_trace and str(naive.trace) in by_trace
    fastest = min(by_trace, key=by_trace.get)
    applied = database.query_schedule(mod, target, "main")
    assert str(applied.trace) == fastest
    assert tvm_equal(applied.mod, tune._default_schedule(mod, target).mod) == (fastest == default_trace)


def tvm_module(func):
    import tvm

    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def tvm_equal(a, b) -> bool:
    import tvm_ffi

    return bool(tvm_ffi.structural_equal(a, b))


def _mean(values) -> float:
    return sum(float(v) for v in values) / len(values)
