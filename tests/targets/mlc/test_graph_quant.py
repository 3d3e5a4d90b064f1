"""ONNX graphs packaged q4f16_1 / q4f32_1 / q0f16: MLC's weight layout in the shards, outputs = onnxruntime.

The model: an embedding lookup and two MatMuls (a [batch, seq] token path) and
a Gemm with transB whose input size (80) is not a whole number of groups.
The reference is onnxruntime on kiln's canonical quantized IR of the same
model (DequantizeLinear of the int4 codes and scales the quantize stage
chose), built here with the mode's own quantize entry, run without graph
optimizations as the compile's own check does.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import compiler
from compiler.api import load_artifact
from passes.quantize.core import QuantContext
from passes.quantize.schemes import parse_scheme
from targets.mlc import loader
from targets.mlc import scheme as mlc_scheme
from targets.triple import resolve_target
from targets.tvm.quant import unpack_words

#: quantized weights: name -> (rows N, columns K) as the package stores them ([N, K/8] words, [N, K/32] scales)
WEIGHTS = {"embed": (1000, 96), "w1": (256, 96), "w2": (64, 256), "w3": (64, 80)}


def _mlp(path) -> None:
    rng = np.random.default_rng(0)

    def init(name, shape, scale=0.1):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [init("embed", (1000, 96)), init("w1", (96, 256)), init("b1", (256,)), init("w2", (256, 64)),
             init("w3", (64, 80)), init("b3", (64,))]
    nodes = [
        helper.make_node("Gather", ["embed", "ids"], ["h0"], name="lookup"),
        helper.make_node("MatMul", ["h0", "w1"], ["h1"], name="mm1"),
        helper.make_node("Add", ["h1", "b1"], ["h2"], name="bias1"),
        helper.make_node("Relu", ["h2"], ["h3"], name="relu"),
        helper.make_node("MatMul", ["h3", "w2"], ["tokens_out"], name="mm2"),
        helper.make_node("Gemm", ["x", "w3", "b3"], ["x_out"], name="gemm", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 80])],
        [helper.make_tensor_value_info("tokens_out", TensorProto.FLOAT, ["batch", "seq", 64]),
         helper.make_tensor_value_info("x_out", TensorProto.FLOAT, ["batch", 64])],
        inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    """(model path, mode -> package), each package compiled on first use."""
    root = tmp_path_factory.mktemp("mlc-mlp")
    path = root / "mlp.onnx"
    _mlp(path)
    built = {}

    def get(mode):
        if mode not in built:
            built[mode] = compiler.compile(str(path), emit="mlc", quantize=mode, output=root / mode)
        return built[mode]

    return path, get


def _canonical(path, mode) -> ir.Model:
    """kiln's quantized IR of the model for ``mode`` (what the package must compute)."""
    model = ir.load(str(path))
    ctx = QuantContext(spec=resolve_target("x86_64-linux-gnu"))
    mlc_scheme.apply(parse_scheme(mode), model, ctx)
    return model


def _feeds(batch=3, seq=5):
    rng = np.random.default_rng(1)
    return {"ids": rng.integers(-1000, 1000, (batch, seq)).astype(np.int64),  # negative ids count from the end
            "x": rng.standard_normal((batch, 80)).astype(np.float32)}


def _ort(model: ir.Model, feeds):
    """onnxruntime without graph optimizations: the QDQ graph's exact meaning (its fused MatMulNBits
    kernels quantize activations at accuracy level 4)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def _records(art) -> dict[str, dict]:
    index = json.loads((art.path / "tensor-cache.json").read_text())
    return {r["name"]: r for s in index["records"] for r in s["records"]}


def _cache_bytes(art) -> int:
    return sum(r["nbytes"] for r in _records(art).values())


@pytest.mark.parametrize("mode,scale_dtype", [("q4f16_1", "float16"), ("q4f32_1", "float32")])
def test_shards_hold_mlc_words_and_scales(mlp, mode, scale_dtype):
    _, get = mlp
    art = get(mode)
    records = _records(art)
    for name, (n, k) in WEIGHTS.items():
        groups = -(-k // 32)
        words, scales = records[f"{name}.q4w"], records[f"{name}.scale"]
        assert (words["dtype"], words["shape"]) == ("uint32", [n, groups * 4])
        assert (scales["dtype"], scales["shape"]) == (scale_dtype, [n, groups])
    # no float copy of a quantized weight: the only float params are the two biases
    floats = sorted(r["name"] for r in records.values() if r["dtype"].startswith("float") and len(r["shape"]) > 1
                    and not r["name"].endswith(".scale"))
    assert floats == []
    assert art.manifest["backend"]["quantization"] == mode
    packed = art.manifest["backend"]["packed"]
    assert packed["QMatMul"] == 3 and packed["QGather"] == 1
    # the two MatMuls (two distinct kernels) run the hand-scheduled kernel; the Gemm (K = 80, not whole
    # groups) keeps the TE one
    assert packed["scheduled_qmatmul_kernels"] == 2


def test_codes_and_scales_are_the_quantized_irs(mlp):
    path, get = mlp
    art = get("q4f16_1")
    arrays = loader.open_weights(art.path).arrays
    model = _canonical(path, "q4f16_1")
    init = model.graph.initializers
    for name, (n, k) in WEIGHTS.items():
        codes = init[f"{name}_quantized"].const_value.numpy().astype(np.int16)
        scale = init[f"{name}_scale"].const_value.numpy()
        if name in ("w1", "w2"):  # MatMul B [K, N], blocks along K
            codes, scale = codes.T, scale.T
        assert codes.shape == (n, k) and codes.min() >= -7 and codes.max() <= 7
        stored = unpack_words(np.asarray(arrays[f"{name}.q4w"]), k)
        np.testing.assert_array_equal(stored, codes)
        assert np.asarray(arrays[f"{name}.scale"]).dtype == np.float16
        np.testing.assert_array_equal(np.asarray(arrays[f"{name}.scale"]).astype(np.float32), scale)


@pytest.mark.parametrize("mode", ["q4f16_1", "q4f32_1"])
def test_outputs_match_onnxruntime_on_the_quantized_ir(mlp, mode):
    path, get = mlp
    art = get(mode)
    feeds = _feeds()
    ours = loader.load(art.path, load_artifact(art.path).manifest).run(feeds)
    ref = _ort(_canonical(path, mode), feeds)
    float_ref = _ort(ir.load(str(path)), feeds)
    for key in ref:
        np.testing.assert_allclose(ours[key], ref[key], rtol=1e-4, atol=1e-5)
        # and int4 is not float: the quantized IR differs from the float model
        assert np.abs(ref[key] - float_ref[key]).max() > 1e-3


def test_q4_package_is_a_fifth_of_q0f32(mlp):
    _, get = mlp
    full = _cache_bytes(get("q0f32"))
    assert _cache_bytes(get("q4f16_1")) <= 0.2 * full
    assert _cache_bytes(get("q4f32_1")) <= 0.25 * full


def test_q0f16_stores_float16_weights(mlp):
    path, get = mlp
    art = get("q0f16")
    canonical = _canonical(path, "q0f16")
    half = sorted(v.const_value.size for v in canonical.graph.initializers.values()
                  if v.const_value.dtype == ir.DataType.FLOAT16)
    assert len(half) >= 4  # the four weights (and the 256-wide bias)
    stored = sorted(int(np.prod(r["shape"])) for r in _records(art).values() if r["dtype"] == "float16")
    assert stored == half
    assert art.manifest["backend"]["quantization"] == "q0f16"
    assert _cache_bytes(art) <= 0.55 * _cache_bytes(get("q0f32"))
    feeds = _feeds(2, 7)
    ours = loader.load(art.path, load_artifact(art.path).manifest).run(feeds)
    ref = _ort(_canonical(path, "q0f16"), feeds)
    for key in ref:
        np.testing.assert_allclose(ours[key], ref[key], rtol=1e-4, atol=1e-5)


def test_graph_library_is_reproducible(mlp, tmp_path):
    path, get = mlp
    again = compiler.compile(str(path), emit="mlc", quantize="q4f16_1", output=tmp_path / "again")
    assert (again.path / "lib.so").read_bytes() == (get("q4f16_1").path / "lib.so").read_bytes()


def test_cnn_keeps_convolutions_in_the_tvm_packed_form(tmp_path):
    """Convolution weights have no MLC layout: they stay in the TVM backend's packed int4, the Gemm in words."""
    from tests.targets.mlc.conftest import CNN

    art = compiler.compile(str(CNN), emit="mlc", quantize="q4f16_1", output=tmp_path / "cnn")
    assert art.manifest["backend"]["quantization"] == "q4f16_1+tvm-packed"
    records = _records(art)
    assert (records["fc.w.q4w"]["dtype"], records["fc.w.q4w"]["shape"]) == ("uint32", [10, 1024 // 8])
    assert records["fc.w.scale"]["dtype"] == "float16"
    assert art.manifest["backend"]["packed"]["QDequantize"] == 1  # conv2.w
    x = np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype(np.float32)
    name = art.inputs[0]["name"]
    ours = loader.load(art.path, load_artifact(art.path).manifest).run({name: x})
    ref = _ort(_canonical(CNN, "q4f16_1"), {name: x})
    for key in ref:
        np.testing.assert_allclose(ours[key], ref[key], rtol=1e-4, atol=1e-6)
