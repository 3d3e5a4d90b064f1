"""The command line as a user drives it: compile, run, inspect, targets, passes, exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import onnxruntime as ort
import pytest

from tests.e2e.conftest import kiln


def _ort(path, inputs):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, inputs)


def test_compile_writes_checked_artifact(tmp_path, example):
    out = tmp_path / "out"
    r = kiln("compile", str(example), "--target", "x86_64-linux-gnu", "-o", str(out))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["emit"] == "onnx"
    assert manifest["target"]["triple"] == "x86_64-linux-gnu"
    assert manifest["verification"]["passed"] is True
    assert [f["path"] for f in manifest["files"]] == ["model.onnx"]
    assert manifest["signature"]["inputs"] == [{"name": "image", "dtype": "float32", "shape": [1, 3, 32, 32]}]
    # -O1 removed the Identity, the Dropout and the run-time shape computation.
    ops = [n.op_type for n in __import__("onnx").load(out / "model.onnx").graph.node]
    assert "Identity" not in ops and "Dropout" not in ops and "Shape" not in ops
    assert any(p["modified"] for p in manifest["pipeline"]["passes"])
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(_ort(out / "model.onnx", {"image": x})[0], _ort(example, {"image": x})[0], rtol=1e-5, atol=1e-6)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_run_with_inputs_and_outputs_file(tmp_path, example):
    out = tmp_path / "art"
    assert kiln("compile", str(example), "-o", str(out), "-q").returncode == 0
    x = np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "in.npz", image=x)
    r = kiln("run", str(out), "--inputs", str(tmp_path / "in.npz"), "-o", str(tmp_path / "res.npz"))
    assert r.returncode == 0, r.stderr
    assert "probs: float32 [1, 10]" in r.stdout
    got = np.load(tmp_path / "res.npz")["probs"]
    np.testing.assert_allclose(got, _ort(example, {"image": x})[0], rtol=1e-5, atol=1e-6)


def test_run_without_inputs_is_seeded(tmp_path, example):
    out = tmp_path / "art"
    assert kiln("compile", str(example), "-o", str(out), "-q").returncode == 0
    a = kiln("run", str(out), "-o", str(tmp_path / "a.npz"), "--seed", "3")
    b = kiln("run", str(out), "-o", str(tmp_path / "b.npz"), "--seed", "3")
    c = kiln("run", str(out), "-o", str(tmp_path / "c.npz"), "--seed", "4")
    assert a.returncode == b.returncode == c.returncode == 0
    pa, pb, pc = (np.load(tmp_path / f"{k}.npz")["probs"] for k in "abc")
    assert np.array_equal(pa, pb)
    assert not np.array_equal(pa, pc)
    np.testing.assert_allclose(pa.sum(), 1.0, rtol=1e-5)


def test_run_rejects_wrong_inputs(tmp_path, example):
    out = tmp_path / "art"
    assert kiln("compile", str(example), "-o", str(out), "-q").returncode == 0
    np.savez(tmp_path / "bad.npz", img=np.zeros((1, 3, 32, 32), np.float32))
    r = kiln("run", str(out), "--inputs", str(tmp_path / "bad.npz"))
    assert r.returncode == 1
    assert "missing 'image'" in r.stderr and "unexpected 'img'" in r.stderr
    np.savez(tmp_path / "bad2.npz", image=np.zeros((1, 3, 16, 16), np.float32))
    r = kiln("run", str(out), "--inputs", str(tmp_path / "bad2.npz"))
    assert r.returncode == 1 and "has shape [1, 3, 16, 16]" in r.stderr


def test_run_detects_damaged_artifact(tmp_path, example):
    out = tmp_path / "art"
    assert kiln("compile", str(example), "-o", str(out), "-q").returncode == 0
    data = bytearray((out / "model.onnx").read_bytes())
    data[-10] ^= 0xFF
    (out / "model.onnx").write_bytes(bytes(data))
    r = kiln("run", str(out))
    assert r.returncode == 1
    assert "does not match its sha256" in r.stderr


def test_inspect_model_and_artifact(tmp_path, example):
    r = kiln("inspect", str(example), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["ops"]["Conv"] == 2 and info["nodes"] == 15
    assert info["opsets"] == {"ai.onnx": 17}
    params = info["parameters"]["float32"]
    assert params["elements"] == 8 * 3 * 9 + 8 + 4 * 8 + 16 * 8 * 9 + 16 + 10 * 1024 + 10
    assert params["bytes"] == params["elements"] * 4
    out = tmp_path / "art"
    assert kiln("compile", str(example), "-o", str(out), "-q").returncode == 0
    r = kiln("inspect", str(out))
    assert r.returncode == 0, r.stderr
    assert "kiln artifact" in r.stdout and "emit=onnx" in r.stdout and "Conv" in r.stdout


def test_targets_and_passes_listings():
    r = kiln("targets")
    assert r.returncode == 0, r.stderr
    for name in ("x86_64-linux-gnu", "aarch64-linux-android", "android-arm64", "raspberry-pi-5"):
        assert name in r.stdout
    rows = json.loads(kiln("targets", "--json").stdout)
    # only installed backends are listed
    from targets import available_emits

    installed = set(available_emits())
    assert all(set(fmts) <= installed for row in rows for fmts in row["emit"].values())
    x86 = next(row for row in rows if row["name"] == "x86_64-linux-gnu")
    assert "onnx" in x86["emit"]["cpu"] and set(x86["emit"]["cpu"]) <= installed
    r = kiln("passes")
    assert r.returncode == 0
    for name in ("fold-constants", "eliminate-dead", "cse", "eliminate-identity", "fold-shapes"):
        assert name in r.stdout
    assert "size-limit" in r.stdout and "-O1" in r.stdout


def test_passes_option_and_verbose_timings(tmp_path, example):
    out = tmp_path / "art"
    r = kiln("compile", str(example), "-o", str(out), "--passes", "eliminate-identity,eliminate-dead", "-v")
    assert r.returncode == 0, r.stderr
    assert "eliminate-identity" in r.stderr and "ms" in r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pipeline"]["spec"] == "eliminate-identity,eliminate-dead"


def test_dump_ir_writes_one_file_per_pass(tmp_path, example):
    dump = tmp_path / "dump"
    r = kiln("compile", str(example), "-o", str(tmp_path / "art"), "--passes", "eliminate-identity,cse", "--dump-ir", str(dump))
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in dump.iterdir())
    assert names == ["000-input.txt", "001-eliminate-identity.txt", "002-cse.txt"]
    assert "Identity" in (dump / "000-input.txt").read_text()
    assert "Identity(" not in (dump / "001-eliminate-identity.txt").read_text()


def test_recompile_replaces_artifact(tmp_path, example):
    out = tmp_path / "art"
    assert kiln("compile", str(example), "-o", str(out), "-O0", "-q").returncode == 0
    first = json.loads((out / "manifest.json").read_text())["pipeline"]["spec"]
    assert kiln("compile", str(example), "-o", str(out), "-O1", "-q").returncode == 0
    second = json.loads((out / "manifest.json").read_text())["pipeline"]["spec"]
    assert first == "" and second != ""


def test_console_script_installed(tmp_path, example):
    exe = shutil.which("kiln")
    assert exe, "the kiln console script is not installed"
    r = subprocess.run([exe, "compile", str(example), "-o", str(tmp_path / "o"), "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "manifest.json").is_file()


@pytest.mark.parametrize("argv", [["compile"], ["compile", "m.onnx"], ["nope"], ["compile", "m.onnx", "-o", "x", "-O", "7"]])
def test_bad_usage_exits_2(argv):
    assert kiln(*argv).returncode == 2
