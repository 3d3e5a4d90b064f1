"""The quantize stage: report figures, the accuracy budget search, calibration sources, bad options."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import onnxruntime as ort
import pytest

from compiler.errors import KilnError
from passes.quantize import numerics, weight_only
from passes.quantize.calibration import CalibrationSet, load_calibration, parse_preprocess
from passes.quantize.core import QuantContext
from passes.quantize.schemes import parse_scheme
from passes.quantize.stage import parse_budget, quantize_model
from targets.triple import resolve_target
from tests.e2e.conftest import kiln
from tests.e2e.test_errors import _assert_clean_failure

SPEC = resolve_target("x86_64-linux-gnu")


def _chain(outlier_layer: int = 2) -> onnx.ModelProto:
    """x -> MatMul(W1) -> Relu -> MatMul(W2) -> Relu -> MatMul(W3). W2 has a large weight at the start
    of each 32-row block, on rows whose input is always 0 (W1's columns 0 and 32 are zero): in float they
    contribute nothing, but they set W2's int4 block scales so high that every other weight rounds to 0."""
    rng = np.random.default_rng(1)
    weights = []
    for i in (1, 2, 3):
        w = rng.standard_normal((64, 64)).astype(np.float32) / 8
        if i == outlier_layer - 1:
            w[:, ::32] = 0.0
        if i == outlier_layer:
            w[::32, :] = 40.0
        weights.append(onnx.numpy_helper.from_array(w, f"w{i}"))
    nodes = [
        oh.make_node("MatMul", ["x", "w1"], ["a1"], name="mm1"), oh.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        oh.make_node("MatMul", ["r1", "w2"], ["a2"], name="mm2"), oh.make_node("Relu", ["a2"], ["r2"], name="relu2"),
        oh.make_node("MatMul", ["r2", "w3"], ["y"], name="mm3"),
    ]
    graph = oh.make_graph(nodes, "chain", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 64])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 64])], weights)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)


def _feeds(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, 64)).astype(np.float32)} for _ in range(n)]


def _run(model: ir.Model | onnx.ModelProto, feeds) -> list[np.ndarray]:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return [sess.run(None, f)[0] for f in feeds]


def _sqnr(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    return numerics.sqnr_db(np.concatenate([r.ravel() for r in ref]), np.concatenate([g.ravel() for g in got]))


def test_report_figures_match_an_independent_measurement():
    data = CalibrationSet.from_feeds(_feeds(8))
    model = ir.from_proto(_chain())
    report = quantize_model(model, parse_scheme("w4"), SPEC, calibration=data)
    held_out = [data[i] for i in (3, 7)]  # HOLDOUT 0.25: every 4th batch
    assert report.evaluation["batches"] == 2
    ref, got = _run(_chain(), held_out), _run(model, held_out)
    assert report.metrics["sqnr"] == pytest.approx(_sqnr(ref, got), rel=1e-6)
    layers = {r.node: r for r in report.layers}
    assert set(layers) == {"mm1", "mm2", "mm3"}
    assert min(layers, key=lambda n: layers[n].sqnr_db) in ("mm2", "mm3")  # the outlier layer and after it
    assert layers["mm1"].sqnr_db > layers["mm2"].sqnr_db
    assert report.bytes_after < 0.2 * report.bytes_before
    as_json = json.loads(json.dumps(report.to_json()))
    assert as_json["model"]["layers_quantized"] == 3 and as_json["layers"][0]["node"] == "mm1"


def test_budget_keeps_the_sensitive_layer_in_float():
    data = CalibrationSet.from_feeds(_feeds(8))
    held_out = [data[i] for i in (3, 7)]
    ref = _run(_chain(), held_out)

    def sqnr_with(exclude: frozenset[str]) -> float:
        m = ir.from_proto(_chain())
        weight_only.apply(parse_scheme("w4"), m, QuantContext(SPEC, exclude=exclude))
        return _sqnr(ref, _run(m, held_out))

    all_q, without_mm2 = sqnr_with(frozenset()), sqnr_with(frozenset({"mm2"}))
    assert without_mm2 > all_q + 6  # the premise: mm2 is where the error comes from
    threshold = (all_q + without_mm2) / 2
    model = ir.from_proto(_chain())
    report = quantize_model(model, parse_scheme("w4"), SPEC, calibration=data,
                            budget=parse_budget(f"sqnr>={threshold}"))
    assert report.budget["kept_float"] == ["mm2"]
    assert report.metrics["sqnr"] >= threshold
    assert _sqnr(ref, _run(model, held_out)) == pytest.approx(without_mm2, rel=1e-6)
    assert "w2" in model.graph.initializers  # float weight kept


def test_unreachable_budget_names_the_best_result():
    with pytest.raises(KilnError, match=r"cannot be met: the best reached is cosine 0\.\d+ with \d+ of 3 layers"):
        quantize_model(ir.from_proto(_chain()), parse_scheme("w4"), SPEC,
                       calibration=CalibrationSet.from_feeds(_feeds(4)), budget=parse_budget("cosine>=1.01"))


@pytest.mark.parametrize("text", ["cosine>0.9", "accuracy>=0.9", "cosine>=abc", ""])
def test_bad_budget(text):
    with pytest.raises(KilnError, match="accuracy-budget"):
        parse_budget(text)


@pytest.mark.parametrize("text,needle", [
    ("w5", "unknown scheme 'w5'"), ("int9", "did you mean int8"), ("w4{block-size=48}", "block-size must be"),
    ("w4{bits=3}", "unknown option 'bits'"), ("int8{method=kl}", "method must be one of"),
    ("w4{symmetric=maybe}", "is not a bool"), ("w4{block-size=64", "expected NAME"),
])
def test_bad_scheme(text, needle):
    with pytest.raises(KilnError, match=needle):
        parse_scheme(text)


def test_scheme_spec_round_trips():
    for text in ["w8", "w4{block-size=64,symmetric=false}", "int8{method=entropy}", "gptq-w4{act-order=true}"]:
        scheme = parse_scheme(text)
        assert parse_scheme(scheme.spec()) == scheme


# ----------------------------------------------------------------------------- calibration sources

SIG = [{"name": "image", "dtype": "float32", "shape": [1, 3, 8, 8]}]


def test_npz_samples_along_axis_0(tmp_path):
    path = tmp_path / "cal.npz"
    data = np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32)
    np.savez(path, image=data)
    cal = load_calibration(path, SIG)
    assert len(cal) == 5
    np.testing.assert_array_equal(cal[3]["image"], data[3:4])
    sym = [{"name": "x", "dtype": "float32", "shape": ["N", 64]}]
    np.savez(tmp_path / "x.npz", x=np.zeros((10, 64), np.float32))
    batches = list(load_calibration(tmp_path / "x.npz", sym))  # symbolic batch: 8 samples per run, then the rest
    assert [b["x"].shape[0] for b in batches] == [8, 2]


@pytest.mark.parametrize("arrays,needle", [
    ({"other": np.zeros((2, 3, 8, 8), np.float32), "more": np.zeros((2, 1))}, "no array for model input(s) image"),
    ({"image": np.zeros((2, 3, 9, 8), np.float32)}, "dimension 2 must be 8"),
    ({"image": np.zeros((2, 3, 8), np.float32)}, "has rank 4"),
])
def test_npz_mismatch_is_a_clear_error(tmp_path, arrays, needle):
    path = tmp_path / "cal.npz"
    np.savez(path, **arrays)
    with pytest.raises(KilnError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        list(load_calibration(path, SIG))


def test_folders(tmp_path):
    from PIL import Image

    npy = tmp_path / "npy"
    npy.mkdir()
    for i in range(3):
        np.save(npy / f"{i}.npy", np.full((3, 8, 8), i, np.float32))  # one sample without the batch axis
    cal = load_calibration(npy, SIG)
    assert len(cal) == 3 and cal[2]["image"].shape == (1, 3, 8, 8) and cal[2]["image"].max() == 2

    images = tmp_path / "img"
    images.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(images / "a.png")
    cal = load_calibration(images, SIG, preprocess="unit")
    x = cal[0]["image"]
    assert x.shape == (1, 3, 8, 8) and 0 <= x.min() and x.max() <= 1
    expected = np.asarray(Image.fromarray(pixels).resize((8, 8), Image.BILINEAR), np.float32) / 255
    np.testing.assert_allclose(x[0].transpose(1, 2, 0), expected, atol=1e-6)

    (images / "b.png").write_bytes(b"not a png")
    with pytest.raises(KilnError, match="b.png: not a readable image"):
        list(load_calibration(images, SIG))
    np.save(images / "c.npy", np.zeros(3))
    with pytest.raises(KilnError, match="either images or .npz/.npy files"):
        load_calibration(images, SIG)


def test_preprocess_specs():
    p = parse_preprocess("imagenet,resize=320,crop=300")
    assert p.resize == 320 and p.crop == 300 and p.mean == (0.485, 0.456, 0.406)
    assert parse_preprocess("scale=1,mean=1:2:3").mean == (1.0, 2.0, 3.0)
    for bad in ("cifar", "resize=big", "gamma=2"):
        with pytest.raises(KilnError, match="calibration-preprocess"):
            parse_preprocess(bad)


def test_calibration_splits_are_disjoint():
    cal = CalibrationSet.from_feeds([{"x": np.full((1,), i)} for i in range(10)])
    train, held = cal.split(0.25)
    seen = [int(f["x"][0]) for f in train] + [int(f["x"][0]) for f in held]
    assert sorted(seen) == list(range(10)) and len(held) == 2


# ----------------------------------------------------------------------------- command line


def test_cli_quantize_with_budget(tmp_path):
    src = tmp_path / "chain.onnx"
    onnx.save(_chain(), src)
    np.savez(tmp_path / "cal.npz", x=np.concatenate([f["x"] for f in _feeds(8)]))
    out = tmp_path / "out"
    r = kiln("compile", str(src), "--quantize", "w4", "--calibration", str(tmp_path / "cal.npz"),
             "--accuracy-budget", "cosine>=0.95", "-o", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "quantization.json").read_text())
    assert report["budget"]["met"] and report["model"]["metrics"]["cosine"] >= 0.95
    assert report["budget"]["kept_float"] == ["mm2"] and report["budget"]["value_all_quantized"] < 0.95
    assert "accuracy budget cosine>=0.95: met" in r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert "quantization.json" in [f["path"] for f in manifest["files"]]


@pytest.mark.parametrize("args,needle", [
    (["--quantize", "int8"], "needs calibration data"),
    (["--quantize", "w4", "--calibration", "/nonexistent/cal.npz"], "no such file or folder"),
    (["--calibration", "x.npz"], "only apply with --quantize"),
    (["--quantize", "w3"], "unknown scheme"),
    (["--quantize", "w4", "--accuracy-budget", "cosine>=1.5"], "cannot be met"),
])
def test_cli_errors(tmp_path, args, needle):
    src = tmp_path / "chain.onnx"
    onnx.save(_chain(), src)
    out = tmp_path / "out"
    _assert_clean_failure(kiln("compile", str(src), *args, "-o", str(out)), tmp_path, out, needle)
