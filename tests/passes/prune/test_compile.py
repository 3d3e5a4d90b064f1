"""--prune through the driver, the Python API and the CLI: report, verification, quantization, backends."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import compiler
from compiler.errors import KilnError
from compiler.ir.metadata import ModelMetadata, get_metadata, set_metadata
from tests.e2e.conftest import kiln
from tests.passes.prune import params, run
from tests.passes.prune.test_coupling import _attention_model
from tests.passes.prune.test_criteria import _two_layer

X = np.random.default_rng(3).standard_normal((1, 3, 6, 6)).astype(np.float32)


@pytest.fixture
def cnn():
    model, _ = _two_layer(np.random.default_rng(30), channels=32, bn=True)
    return model


@pytest.mark.parametrize("opt_level", [1, 2])
def test_api_compile_prunes_reports_and_verifies_against_the_pruned_model(cnn, tmp_path, opt_level):
    art = compiler.compile(cnn, output=tmp_path / "a", opt_level=opt_level, prune="channels=0.5,protect=none")
    info = art.manifest["pruning"]
    assert info["report"] == "pruning.json" and info["params_after"] < info["params_before"]
    report = art.pruning
    assert report["spec"] == "channels=0.5,criterion=l2,protect=none" and report["groups"]
    assert art.manifest["verification"]["passed"] is True
    assert "the pruned model before emit" in art.manifest["verification"]["method"]
    pruned = onnx.load(str(art.path / "model.onnx"))
    assert params(pruned) == report["model"]["params_after"] < params(cnn)
    assert art.run({"x": X})["y"].shape == (1, 4, 6, 6)
    # identical input and options give identical bytes
    again = compiler.compile(cnn, output=tmp_path / "b", opt_level=opt_level, prune="channels=0.5,protect=none")
    assert [f["sha256"] for f in again.manifest["files"]] == [f["sha256"] for f in art.manifest["files"]]


def test_prune_then_quantize_w8_for_onnx(cnn, tmp_path):
    art = compiler.compile(cnn, output=tmp_path / "a", prune="channels=0.5,protect=none", quantize="w8")
    assert art.manifest["pruning"]["params_after"] < art.manifest["pruning"]["params_before"]
    assert art.manifest["quantization"]["scheme"] == "w8"
    assert "quantized" in art.manifest["verification"]["method"] and art.manifest["verification"]["passed"]
    model = onnx.load(str(art.path / "model.onnx"))
    int8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert int8 and all(t.dims[0] == 16 for t in int8 if len(t.dims) == 4 and t.dims[1] == 3)
    assert art.run({"x": X})["y"].shape == (1, 4, 6, 6)


@pytest.fixture(scope="module")
def pruned_float(tmp_path_factory):
    """(model, the pruned float model's output on X from onnxruntime, its parameter count)."""
    model, _ = _two_layer(np.random.default_rng(30), channels=32, bn=True)
    art = compiler.compile(model, output=tmp_path_factory.mktemp("float") / "a", prune=PRUNE_SPEC)
    ref = run(onnx.load(str(art.path / "model.onnx")), {"x": X})["y"]
    return model, ref, art.manifest["pruning"]["params_after"]


PRUNE_SPEC = "channels=0.5,protect=none"
#: w8 (per-channel symmetric int8 weights): the output may move by a few tenths of a percent of its range
W8_TOLERANCE = 0.02


@pytest.mark.parametrize("emit", ["onnx", "tvm"])
def test_pruned_and_w8_matches_the_pruned_float_model(pruned_float, emit, tmp_path):
    model, ref, params_after = pruned_float
    art = compiler.compile(model, emit=emit, output=tmp_path / emit, prune=PRUNE_SPEC, quantize="w8")
    assert art.manifest["pruning"]["params_after"] == params_after < params(model)
    assert art.manifest["quantization"]["scheme"] == "w8"
    assert art.manifest["verification"]["passed"] is True
    got = art.run({"x": X})["y"]
    assert got.shape == ref.shape == (1, 4, 6, 6)
    error = float(np.abs(got - ref).max() / np.abs(ref).max())
    assert 0 < error <= W8_TOLERANCE, f"{emit}: relative error {error:.2e} against the pruned float model"


def test_prune_for_tvm(cnn, tmp_path):
    from targets import available_emits

    assert "tvm" in available_emits(), "the tvm backend is part of this kiln"
    art = compiler.compile(cnn, emit="tvm", output=tmp_path / "a", prune="channels=0.5,protect=none")
    assert art.manifest["verification"]["passed"] is True
    assert "the pruned model before emit" in art.manifest["verification"]["method"]
    assert art.run({"x": X})["y"].shape == (1, 4, 6, 6)


def test_lstsq_recovery_through_the_api(cnn, tmp_path):
    rng = np.random.default_rng(31)
    calibration = [{"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)} for _ in range(6)]
    art = compiler.compile(cnn, output=tmp_path / "a", prune="channels=0.5,protect=none", prune_recover="lstsq",
                           calibration=calibration)
    (layer,) = art.pruning["recovery"]["layers"]
    assert layer["layer"] == "conv2" and layer["relative_error_after"] < layer["relative_error_before"]


def test_bad_prune_options_fail_before_any_work(cnn, tmp_path):
    with pytest.raises(KilnError, match="unknown key 'ratio'"):
        compiler.compile(cnn, output=tmp_path / "a", prune="ratio=0.3")
    with pytest.raises(KilnError, match="--prune-recover only applies with --prune"):
        compiler.compile(cnn, output=tmp_path / "a", prune_recover="lstsq")
    assert not (tmp_path / "a").exists()


def test_cli_prune(cnn, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(cnn, str(path))
    r = kiln("compile", str(path), "--prune", "channels=0.5,protect=none", "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "pruned 1 of" in r.stderr and "parameters" in r.stderr
    assert json.loads((tmp_path / "out" / "pruning.json").read_text())["model"]["params_after"] > 0
    r = kiln("compile", str(path), "--prune", "channels=0.5,criterion=l7", "-o", str(tmp_path / "bad"))
    assert r.returncode == 1 and "kiln: error: --prune 'channels=0.5,criterion=l7': unknown criterion 'l7'" in r.stderr
    np.savez(tmp_path / "cal.npz", x=np.random.default_rng(0).standard_normal((4, 3, 6, 6)).astype(np.float32))
    r = kiln("compile", str(path), "--prune", "channels=0.5,protect=none", "--prune-recover", "lstsq",
             "--calibration", str(tmp_path / "cal.npz"), "-o", str(tmp_path / "rec"))
    assert r.returncode == 0, r.stderr
    assert "lstsq refit 1 layer(s)" in r.stderr


def test_architecture_metadata_follows_the_heads():
    from passes.prune import parse_prune, prune_model

    proto, _ = _attention_model(np.random.default_rng(32))
    model = ir.serde.deserialize_model(proto)
    set_metadata(model, ModelMetadata(architecture={"family": "llama", "num_attention_heads": 4,
                                                    "num_key_value_heads": 2, "hidden_size": 32}))
    prune_model(model, None, parse_prune("heads=0.5,protect=none"))
    arch = get_metadata(model).architecture
    assert (arch["num_attention_heads"], arch["num_key_value_heads"], arch["hidden_size"]) == (2, 1, 32)
    assert arch["pruned"] is True
