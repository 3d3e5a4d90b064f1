"""Bad input: one clear line, a non-zero exit, and no artifact left behind."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from tests.e2e.conftest import kiln


def _assert_clean_failure(r, tmp_path, out, *needles):
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("kiln: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists(), "a failed compile left an artifact"
    leftovers = [p.name for p in out.parent.iterdir() if ".kiln-" in p.name] if out.parent.exists() else []
    assert not leftovers, leftovers


def test_corrupt_model(tmp_path, example):
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(example.read_bytes()[: len(example.read_bytes()) // 2])
    out = tmp_path / "out"
    _assert_clean_failure(kiln("compile", str(bad), "-o", str(out)), tmp_path, out, str(bad), "not an ONNX model")


def test_not_a_model(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("these are my notes, not a model\n" * 20)
    out = tmp_path / "out"
    _assert_clean_failure(kiln("compile", str(bad), "-o", str(out)), tmp_path, out, "not an ONNX model")


def test_empty_and_missing_file(tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    out = tmp_path / "out"
    _assert_clean_failure(kiln("compile", str(empty), "-o", str(out)), tmp_path, out, "empty")
    _assert_clean_failure(kiln("compile", str(tmp_path / "missing.onnx"), "-o", str(out)), tmp_path, out, "no such file")


def test_unknown_target_suggests(tmp_path, example):
    out = tmp_path / "out"
    r = kiln("compile", str(example), "--target", "aarch64-linx-gnu", "-o", str(out))
    _assert_clean_failure(r, tmp_path, out, "aarch64-linx-gnu")
    assert "aarch64-linux-gnu" in r.stderr


def test_unknown_emit(tmp_path, example):
    out = tmp_path / "out"
    _assert_clean_failure(kiln("compile", str(example), "--emit", "tflite", "-o", str(out)), tmp_path, out, "tflite")


def test_output_inside_a_file(tmp_path, example):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    out = blocker / "out"
    r = kiln("compile", str(example), "-o", str(out))
    assert r.returncode == 1 and r.stderr.startswith("kiln: error: ")
    assert blocker.read_text() == "x"


def test_unwritable_output_directory(tmp_path, example):
    # /proc refuses new folders even for root, unlike permission bits.
    out = tmp_path / "never"
    r = kiln("compile", str(example), "-o", "/proc/kiln-out/model")
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("kiln: error: ") and "/proc/kiln-out" in r.stderr
    assert not out.exists()


def test_refuses_to_overwrite_a_foreign_folder(tmp_path, example):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    r = kiln("compile", str(example), "-o", str(out))
    assert r.returncode == 1 and "not a kiln artifact" in r.stderr
    assert (out / "thesis.tex").read_text() == "precious"


def test_unsupported_ops_listed_at_once(tmp_path):
    nodes = [
        helper.make_node("FancyOp", ["x"], ["a"], domain="acme.ops", name="fancy1"),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),
        helper.make_node("OtherOp", ["b"], ["y"], domain="acme.ops", name="fancy2"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("acme.ops", 1)])
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    out = tmp_path / "out"
    r = kiln("compile", str(path), "-o", str(out))
    _assert_clean_failure(r, tmp_path, out, "2 problem(s)")
    assert "fancy1" in r.stderr and "fancy2" in r.stderr and "acme.ops::OtherOp" in r.stderr


def test_bad_pipeline(tmp_path, example):
    out = tmp_path / "out"
    r = kiln("compile", str(example), "--passes", "fold-constant", "-o", str(out))
    _assert_clean_failure(r, tmp_path, out, "unknown pass 'fold-constant'")
    assert "fold-constants" in r.stderr
    r = kiln("compile", str(example), "--passes", "fold-constants{size-limit=big}", "-o", str(out))
    _assert_clean_failure(r, tmp_path, out, "size-limit='big'")


def test_debug_shows_traceback(tmp_path):
    r = kiln("compile", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o"), "--debug")
    assert r.returncode == 1 and "Traceback" in r.stderr


@pytest.mark.parametrize("command", ["run", "inspect"])
def test_run_and_inspect_bad_paths(tmp_path, command):
    r = kiln(command, str(tmp_path / "nothing-here"))
    assert r.returncode == 1 and r.stderr.startswith("kiln: error: ")


def test_emit_the_target_device_cannot_take(tmp_path, example):
    out = tmp_path / "out"
    r = kiln("compile", str(example), "--target", "aarch64-linux-android", "--device", "opencl", "-o", str(out))
    _assert_clean_failure(r, tmp_path, out, "does not support --emit onnx")
    assert "tvm" in r.stderr


def test_device_the_triple_cannot_have(tmp_path, example):
    out = tmp_path / "out"
    r = kiln("compile", str(example), "--target", "aarch64-linux-gnu", "--device", "metal", "-o", str(out))
    _assert_clean_failure(r, tmp_path, out, "metal")
