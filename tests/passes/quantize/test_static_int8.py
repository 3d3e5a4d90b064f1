"""Static W8A8 (``int8``, passes/quantize/static_int8.py).

- a tiny conv model: the inserted Q/DQ parameters, weight codes and int32 biases
  against a numpy reference, and the model's output against a numpy simulation;
- EfficientNet-Lite0 (real weights) on photo crops (tests/image_data.py):
  top-1 agreement with float32 >= 0.95 in onnxruntime, size <= 0.3x, integer kernels;
- all-MiniLM-L6-v2 (real weights): mean sentence-embedding cosine >= 0.99;
- end to end through ``compiler.compile`` with a folder of PNG images.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import compiler
from compiler.errors import KilnError
from passes.quantize import static_int8
from passes.quantize.calibration import CalibrationSet, load_calibration
from passes.quantize.capture import capture
from passes.quantize.core import QuantContext, ensure_node_names
from passes.quantize.schemes import parse_scheme
from tests import image_data, model_zoo, text_data
from tests.helpers import model_from_text

TINY = """
<ir_version: 8, opset_import: ["" : 17]>
tiny (float[N, 4, 6, 6] x) => (float[N, 3, 6, 6] y)
<float[8, 4, 1, 1] w1 = {W1}, float[8] b1 = {B1}, float[3, 8, 3, 3] w2 = {W2}, float[3] b2 = {B2}> {
  a = Conv <group = 1> (x, w1, b1)
  r = Relu (a)
  y = Conv <pads = [1, 1, 1, 1]> (r, w2, b2)
}
"""


def _fill(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, str]:
    a = rng.standard_normal(shape).astype(np.float32)
    return a, ", ".join(repr(float(v)) for v in a.ravel())


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    arrays, texts = {}, {}
    for key, shape in {"W1": (8, 4, 1, 1), "B1": (8,), "W2": (3, 8, 3, 3), "B2": (3,)}.items():
        arrays[key], texts[key] = _fill(rng, shape)
    text = TINY
    for key, value in texts.items():
        text = text.replace("{" + key + "}", "{" + value + "}")
    feeds = [{"x": rng.standard_normal((2, 4, 6, 6)).astype(np.float32) * (1 + i)} for i in range(4)]
    return text, arrays, feeds


def _session(model, *, optimize: bool = True, optimized_path=None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    if isinstance(model, ir.Model):
        model = ir.to_proto(model).SerializeToString()
    elif isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    else:
        model = str(model)
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _fake_quant(x: np.ndarray, scale: float, zero: int, qmin: int = 0, qmax: int = 255) -> np.ndarray:
    return ((np.clip(np.round(x / scale) + zero, qmin, qmax) - zero) * scale).astype(np.float32)


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, pad: int) -> np.ndarray:
    """NCHW conv, stride 1, symmetric zero padding (numpy reference)."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = w.shape[2:]
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))  # N C H W kh kw
    return np.einsum("nchwij,ocij->nohw", win, w, optimize=True) + b[None, :, None, None]


def _initializer(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def test_tiny_conv_matches_the_numpy_reference(tiny):
    text, arrays, feeds = tiny
    model = model_from_text(text)
    float_model = model_from_text(text)
    records = static_int8.apply(parse_scheme("int8{method=minmax}"), model,
                                QuantContext(spec=None, calibration=CalibrationSet.from_feeds(feeds)))
    assert [(r.op, r.scheme) for r in records] == [("Conv", "int8{method=minmax}")] * 2
    assert [o.name for o in model.graph.outputs] == ["y"]

    # activations: x (conv 1's input) and r (conv 1's output after the absorbed Relu); y is a graph output
    xs = np.concatenate([f["x"] for f in feeds])
    rs = np.concatenate([out["r"] for out in capture(float_model, ["r"], feeds)])
    params = {}
    for name, data in (("x", xs), ("r", rs)):
        lo, hi = min(float(data.min()), 0.0), max(float(data.max()), 0.0)
        scale, zero = (hi - lo) / 255, round(-lo / (hi - lo) * 255)
        got_scale, got_zero = _initializer(model, f"{name}_scale"), _initializer(model, f"{name}_zero_point")
        assert got_zero.dtype == np.uint8 and int(got_zero) == zero
        np.testing.assert_allclose(got_scale, scale, rtol=1e-6)
        params[name] = float(got_scale), int(got_zero)
    assert Counter(n.op_type for n in model.graph)["QuantizeLinear"] == 2

    # weights: symmetric per output channel, stored as uint8 codes + 128 (U8U8 kernels)
    codes, scales = {}, {}
    for key, name in (("W1", "w1"), ("W2", "w2")):
        w = arrays[key]
        scale = np.abs(w).reshape(w.shape[0], -1).max(axis=1) / 127
        want = np.clip(np.round(w / scale[:, None, None, None]), -127, 127).astype(np.int16) + 128
        np.testing.assert_array_equal(_initializer(model, f"{name}_quantized"), want)
        np.testing.assert_array_equal(_initializer(model, f"{name}_zero"), np.full(w.shape[0], 128))
        np.testing.assert_allclose(_initializer(model, f"{name}_scale"), scale, rtol=1e-6)
        codes[key], scales[key] = want.astype(np.float32) - 128, scale

    # biases: int32 at input_scale * weight_scale, minus the mean output shift of the weight rounding
    inputs = {"W1": (xs, params["x"]), "W2": (rs, params["r"])}
    deq_bias = {}
    for key, bkey, name in (("W1", "B1", "b1"), ("W2", "B2", "b2")):
        w, data, (s_in, _) = arrays[key], *inputs[key]
        err = codes[key] * scales[key][:, None, None, None] - w
        shift = (err.sum(axis=(2, 3)) * data.mean(axis=(0, 2, 3))[None, :]).sum(axis=1)
        bias_scale = (s_in * scales[key]).astype(np.float32)
        want = np.round((arrays[bkey] - shift) / bias_scale)
        got = _initializer(model, f"{name}_quantized")
        assert got.dtype == np.int32
        np.testing.assert_allclose(got, want, atol=1)
        deq_bias[key] = got * bias_scale

    # the whole model: onnxruntime (no graph optimizations = the QDQ meaning) vs a numpy simulation
    x = feeds[0]["x"]
    w1 = codes["W1"] * scales["W1"][:, None, None, None]
    w2 = codes["W2"] * scales["W2"][:, None, None, None]
    r = _fake_quant(np.maximum(_conv(_fake_quant(x, *params["x"]), w1, deq_bias["W1"], 0), 0), *params["r"])
    want = _conv(r, w2, deq_bias["W2"], 1)
    got = _session(model, optimize=False).run(None, feeds[0])[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # and onnxruntime's integer kernels compute the same within rounding
    fused = _session(model).run(None, feeds[0])[0]
    assert np.linalg.norm(fused - got) <= 0.01 * np.linalg.norm(got)
    # close to the float model too
    ref = _session(float_model).run(None, feeds[0])[0]
    assert np.linalg.norm(got - ref) <= 0.05 * np.linalg.norm(ref)


def test_int8_weight_storage_and_7bit_options(tiny):
    text, _, feeds = tiny
    model = model_from_text(text)
    ctx = QuantContext(spec=None, calibration=CalibrationSet.from_feeds(feeds))
    static_int8.apply(parse_scheme("int8"), model, ctx, static_int8.Placement(weight_storage="int8", reduce_range=True))
    w = _initializer(model, "w1_quantized")
    assert w.dtype == np.int8 and np.abs(w).max() == 63
    assert "w1_zero" not in model.graph.initializers
    out = _session(model, optimize=False).run(None, feeds[1])[0]
    ref = _session(model_from_text(text)).run(None, feeds[1])[0]
    assert np.linalg.norm(out - ref) <= 0.05 * np.linalg.norm(ref)


def test_needs_calibration(tiny):
    with pytest.raises(KilnError, match="needs calibration data"):
        static_int8.apply(parse_scheme("int8"), model_from_text(tiny[0]), QuantContext(spec=None))


def test_excluded_layer_stays_float(tiny):
    text, _, feeds = tiny
    model = model_from_text(text)
    ensure_node_names(model.graph)
    names = [n.name for n in model.graph if n.op_type == "Conv"]
    records = static_int8.apply(parse_scheme("int8"), model, QuantContext(
        spec=None, calibration=CalibrationSet.from_feeds(feeds), exclude=frozenset(names[1:])))
    assert [(r.node, r.scheme) for r in records] == [(names[0], "int8"), (names[1], "float32")]
    assert "w2" in model.graph.initializers and "w2_quantized" not in model.graph.initializers
    assert "w1_quantized" in model.graph.initializers


THREE = """
<ir_version: 8, opset_import: ["" : 17]>
three (float[N, 4, 5, 5] x) => (float[N, 4, 5, 5] y)
<float[4, 4, 1, 1] wa = {WA}, float[4, 4, 1, 1] wb = {WB}, float[4, 4, 1, 1] wc = {WC}, float[4] bb = {BB}> {
  a = Conv (x, wa)
  ra = Relu (a)
  b = Conv (ra, wb, bb)
  rb = Relu (b)
  c = Conv (rb, wc)
  y = Relu (c)
}
"""


def test_a_layer_kept_float_between_quantized_ones_stays_float(tmp_path):
    """onnxruntime quantizes (per tensor) the weights of a float Conv read from a DequantizeLinear and
    feeding a QuantizeLinear; a layer the accuracy budget keeps in float must read the float value."""
    rng = np.random.default_rng(1)
    text = THREE
    for key, shape in {"WA": (4, 4, 1, 1), "WB": (4, 4, 1, 1), "WC": (4, 4, 1, 1), "BB": (4,)}.items():
        text = text.replace("{" + key + "}", "{" + _fill(rng, shape)[1] + "}")
    model = model_from_text(text)
    ensure_node_names(model.graph)
    middle = [n.name for n in model.graph if n.op_type == "Conv"][1]
    feeds = [{"x": rng.standard_normal((2, 4, 5, 5)).astype(np.float32)} for _ in range(3)]
    records = static_int8.apply(parse_scheme("int8"), model, QuantContext(
        spec=None, calibration=CalibrationSet.from_feeds(feeds), exclude=frozenset([middle])))
    assert [r.scheme for r in records] == ["int8", "float32", "int8"]
    conv_b = next(n for n in model.graph if n.name == middle)
    assert conv_b.inputs[0].producer().op_type == "Relu"  # the float value, not a DequantizeLinear
    _session(model, optimized_path=tmp_path / "ort.onnx")
    optimized = onnx.load(str(tmp_path / "ort.onnx"))
    readers = [(n.op_type, n.domain) for n in optimized.graph.node if "ra" in n.input]
    assert readers in ([("Conv", "")], [("Conv", "com.microsoft.nchwc")]), readers  # a float conv
    assert not [t.name for t in optimized.graph.initializer if "weight_scale" in t.name]  # nothing requantized


# --- EfficientNet-Lite0 -----------------------------------------------------------------------

CALIBRATION_IMAGES = 64


@pytest.fixture(scope="module")
def effnet(tmp_path_factory):
    """EfficientNet-Lite0 after -O2 (the quantize stage's input) and its float32 file."""
    from compiler.passes import PassManager, opt_level_pipeline

    source = model_zoo.efficientnet_lite0(tmp_path_factory.mktemp("zoo"))
    model = ir.load(source)
    PassManager(opt_level_pipeline(2)).run(model)
    path = tmp_path_factory.mktemp("effnet") / "float.onnx"
    ir.save(model, path)
    return path


@pytest.fixture(scope="module")
def effnet_int8(effnet, tmp_path_factory):
    model = ir.load(effnet)
    feeds = image_data.feeds(image_data.calibration(CALIBRATION_IMAGES))
    records = static_int8.apply(parse_scheme("int8"), model,
                                QuantContext(spec=None, calibration=CalibrationSet.from_feeds(feeds)))
    path = tmp_path_factory.mktemp("effnet-int8") / "int8.onnx"
    ir.save(model, path)
    return path, records


def test_effnet_int8_keeps_top1(effnet, effnet_int8, tmp_path):
    images = image_data.evaluation(image_data.count() // 2)  # the whole evaluation split
    ref = _session(effnet).run(None, {"image": images})[0].argmax(axis=1)
    got = _session(effnet_int8[0], optimized_path=tmp_path / "ort.onnx").run(None, {"image": images})[0]
    agreement = float((got.argmax(axis=1) == ref).mean())
    assert agreement >= 0.95, f"top-1 agreement {agreement:.3f}"
    # onnxruntime runs it on integer kernels: every quantized conv fused, the classifier a QGemm
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "ort.onnx")).graph.node)
    convs = sum(1 for r in effnet_int8[1] if r.op == "Conv" and r.scheme != "float32")
    assert ops["QLinearConv"] == convs and ops["QGemm"] == 1, ops
    assert ops["QLinearAdd"] == 9, ops


def test_effnet_int8_size_and_records(effnet, effnet_int8):
    path, records = effnet_int8
    assert path.stat().st_size <= 0.3 * effnet.stat().st_size
    schemes = Counter(r.scheme for r in records)
    assert schemes == {"int8": 47, "float32": 3}, schemes
    quantized = [r for r in records if r.scheme == "int8"]
    assert sum(r.bytes_after for r in quantized) <= 0.3 * sum(r.bytes_before for r in quantized)
    model = ir.load(path)
    # every quantized layer keeps its output value name
    outputs = {o.name for n in model.graph for o in n.outputs}
    assert all(r.output in outputs for r in records)


# --- all-MiniLM-L6-v2 -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    from compiler.passes import PassManager, opt_level_pipeline

    model = ir.load(model_zoo.minilm(tmp_path_factory.mktemp("zoo")))
    PassManager(opt_level_pipeline(2)).run(model)
    path = tmp_path_factory.mktemp("minilm") / "float.onnx"
    ir.save(model, path)
    return path


def test_minilm_int8_keeps_sentence_embeddings(minilm, tmp_path):
    model = ir.load(minilm)
    calibration = CalibrationSet.from_feeds(text_data.feeds(32, batch=16, seq=32))
    records = static_int8.apply(parse_scheme("int8"), model, QuantContext(spec=None, calibration=calibration))
    assert Counter((r.op, r.scheme) for r in records) == {("MatMul", "int8"): 36, ("Gather", "int8"): 3}
    path = tmp_path / "int8.onnx"
    ir.save(model, path)
    evaluation = text_data.feeds(256, batch=16, seq=32, start=text_data.HELD_OUT)
    reference, quantized = _session(minilm), _session(path, optimized_path=tmp_path / "ort.onnx")
    cos = np.concatenate([text_data.embedding_cosine(reference.run(None, f)[0], quantized.run(None, f)[0],
                                                     f["attention_mask"]) for f in evaluation])
    assert cos.mean() >= 0.99, f"mean cosine {cos.mean():.5f}"
    # every weight matmul runs on integers; attention's activation x activation matmuls stay float
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "ort.onnx")).graph.node)
    assert ops["MatMulIntegerToFloat"] == 36, ops
    assert path.stat().st_size <= 0.3 * minilm.stat().st_size


# --- end to end -------------------------------------------------------------------------------


def test_compile_with_an_image_folder(effnet, tmp_path):
    folder = tmp_path / "images"
    image_data.write_pngs(folder, 16)
    # the PNGs read back through --calibration-preprocess are exactly the arrays the tests use
    spec = [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 224, 224]}]
    loaded = np.concatenate(list(f["image"] for f in load_calibration(folder, spec, preprocess=image_data.PREPROCESS)))
    np.testing.assert_array_equal(loaded, image_data.calibration(16))

    art = compiler.compile(str(effnet), output=tmp_path / "out", opt_level=2, quantize="int8",
                           calibration=str(folder), calibration_preprocess=image_data.PREPROCESS)
    report = json.loads((art.path / "quantization.json").read_text())
    layers = Counter(layer["scheme"] for layer in report["layers"])
    assert layers == {"int8": 47, "float32": 3}, layers
    assert art.manifest["verification"].get("passed") is True, art.manifest["verification"]
    images = image_data.evaluation(16)
    got = art.run({"image": images})["logits"]
    want = _session(effnet).run(None, {"image": images})[0]
    assert float((got.argmax(1) == want.argmax(1)).mean()) >= 0.85
