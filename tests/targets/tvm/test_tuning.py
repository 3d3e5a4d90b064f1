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
