"""The backend contract around the build: legalize lists every op TVM cannot lower at once, options are
checked, artifacts are byte-identical, params can live outside the library (a tensor cache), CLI flags."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest

import compiler
from compiler.errors import KilnError, UnsupportedError
from targets import available_emits

from .helpers import assert_matches, kiln, kiln_run, ort_run

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "models" / "tiny_cnn.onnx"


def _unlowerable() -> onnx.ModelProto:
    """Relu, then three nodes TVM cannot lower: an If, a com.microsoft contrib op and a QLinearMatMul."""
    f = onnx.TensorProto.FLOAT
    branch = oh.make_graph([oh.make_node("Identity", ["r"], ["b"])], "b", [], [oh.make_tensor_value_info("b", f, [2])])
    nodes = [
        oh.make_node("Relu", ["x"], ["r"], name="relu"),
        oh.make_node("ReduceSum", ["r"], ["s"], name="sum", keepdims=0),
        oh.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
        oh.make_node("If", ["c"], ["y"], name="branch", then_branch=branch, else_branch=branch),
        oh.make_node("FastGelu", ["r"], ["g"], name="gelu", domain="com.microsoft"),
        oh.make_node("QLinearMatMul", ["q", "one", "z8", "q", "one", "z8", "one", "z8"], ["m"], name="qmm"),
    ]
    graph = oh.make_graph(
        nodes, "bad", [oh.make_tensor_value_info("x", f, [2]), oh.make_tensor_value_info("q", onnx.TensorProto.UINT8, [2, 2])],
        [oh.make_tensor_value_info("y", f, [2]), oh.make_tensor_value_info("g", f, [2]),
         oh.make_tensor_value_info("m", onnx.TensorProto.UINT8, [2, 2])],
        [oh.make_tensor("zero", f, [], [0.0]), oh.make_tensor("one", f, [], [1.0]),
         oh.make_tensor("z8", onnx.TensorProto.UINT8, [], [0])],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("com.microsoft", 1)])


def test_legalize_names_every_problem_at_once(tmp_path):
    with pytest.raises(UnsupportedError) as err:
        compiler.compile(_unlowerable(), emit="tvm", output=tmp_path / "a")
    assert str(err.value).startswith("3 problem(s) stop --emit tvm")
    hint = err.value.hint
    assert "node 'branch': If (control flow)" in hint
    assert "node 'gelu': com.microsoft::FastGelu" in hint
    assert "node 'qmm': QLinearMatMul has no TVM lowering" in hint
    assert not (tmp_path / "a").exists()  # nothing half-written


def test_cli_error_is_one_line(tmp_path):
    model = tmp_path / "bad.onnx"
    onnx.save(_unlowerable(), model)
    proc = kiln("compile", str(model), "--emit", "tvm", "-o", str(tmp_path / "a"))
    assert proc.returncode == 1
    first, *rest = proc.stderr.splitlines()
    assert first.startswith("kiln: error: 3 problem(s) stop --emit tvm") and "Traceback" not in proc.stderr


def test_tvm_is_listed_when_installed():
    assert "tvm" in available_emits()
    proc = kiln("targets", "--json")
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert "tvm" in rows["x86_64-linux-gnu"]["emit"]["cpu"]


def test_unknown_option_and_bad_params_mode(tmp_path):
    with pytest.raises(KilnError, match="unknown --emit tvm option"):
        compiler.compile(str(EXAMPLE), emit="tvm", output=tmp_path / "a", tune_trails=3)
    with pytest.raises(KilnError, match="expected embedded or external"):
        compiler.compile(str(EXAMPLE), emit="tvm", output=tmp_path / "a", params="outside")


def test_tvm_flags_with_another_emit_are_refused(tmp_path):
    proc = kiln("compile", str(EXAMPLE), "--emit", "onnx", "--params", "external", "-o", str(tmp_path / "a"))
    assert proc.returncode == 1 and "--params apply to --emit tvm" in proc.stderr


def test_artifacts_are_byte_identical(tmp_path):
    a = compiler.compile(str(EXAMPLE), emit="tvm", output=tmp_path / "a", params="external")
    b = compiler.compile(str(EXAMPLE), emit="tvm", output=tmp_path / "b", params="external")
    assert a.manifest["files"] == b.manifest["files"]


def test_external_params_are_a_tensor_cache(tmp_path):
    from tvm.contrib import tvmjs
    import tvm

    art = compiler.compile(str(EXAMPLE), emit="tvm", output=tmp_path / "art", params="external")
    files = [f["path"] for f in art.manifest["files"]]
    assert "params/tensor-cache.json" in files and any(f.startswith("params/params_shard_") for f in files)
    names = art.manifest["backend"]["params"]["names"]
    cache, _ = tvmjs.load_tensor_cache(str(art.path / "params"), tvm.cpu())
    assert sorted(cache) == sorted(names)
    # weights, prepared once: the convolution kernels are stored in HWIO for the channels-last schedule
    embedded = compiler.compile(str(EXAMPLE), emit="tvm", output=tmp_path / "emb")
    lib_bytes = lambda a: (a.path / "lib.so").stat().st_size  # noqa: E731
    assert lib_bytes(art) < lib_bytes(embedded)
    inputs = {"image": np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    assert_matches(ort_run(EXAMPLE, inputs), kiln_run(art.path, inputs, tmp_path))


def _symbolic_mlp() -> onnx.ModelProto:
    """MatMul-Relu-MatMul-Softmax-Reshape over symbolic (batch, seq): the VM computes shapes at run time."""
    import onnx.numpy_helper as nh

    f = onnx.TensorProto.FLOAT
    rng = np.random.default_rng(0)
    weights = [nh.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1"),
               nh.from_array(rng.standard_normal((32, 8)).astype(np.float32), "w2"),
               nh.from_array(np.array([0, -1], np.int64), "flat")]
    nodes = [oh.make_node("MatMul", ["x", "w1"], ["h"]), oh.make_node("Relu", ["h"], ["r"]),
             oh.make_node("MatMul", ["r", "w2"], ["o"]), oh.make_node("Softmax", ["o"], ["p"], axis=-1),
             oh.make_node("Reshape", ["p", "flat"], ["y"])]
    graph = oh.make_graph(nodes, "mlp", [oh.make_tensor_value_info("x", f, ["batch", "seq", 16])],
                          [oh.make_tensor_value_info("y", f, ["batch", None])], weights)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def test_library_bytes_do_not_depend_on_the_process(tmp_path):
    """TVM's shape functions stored heap slots in an order that followed object addresses, so each process
    built a different lib.so; four fresh CLI processes must now build the same bytes."""
    import hashlib

    model = tmp_path / "mlp.onnx"
    onnx.save(_symbolic_mlp(), model)
    digests = set()
    for i in range(4):
        proc = kiln("compile", str(model), "--emit", "tvm", "-q", "-o", str(tmp_path / f"out{i}"))
        assert proc.returncode == 0, proc.stderr
        digests.add(hashlib.sha256((tmp_path / f"out{i}" / "lib.so").read_bytes()).hexdigest())
    assert len(digests) == 1
    x = np.random.default_rng(1).standard_normal((2, 5, 16)).astype(np.float32)
    assert_matches(ort_run(model, {"x": x}), kiln_run(tmp_path / "out0", {"x": x}, tmp_path))
