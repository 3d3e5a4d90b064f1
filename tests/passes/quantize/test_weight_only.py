"""w8 / w4: the quantized model computes what numpy computes with the reference-dequantized weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import onnxruntime as ort
import pytest

from compiler.ir.quant import get_quant
from passes.quantize import numerics, weight_only
from passes.quantize.core import QuantContext
from passes.quantize.schemes import parse_scheme
from targets.triple import resolve_target

RNG = np.random.default_rng(0)
W_MM = RNG.standard_normal((64, 48)).astype(np.float32)  # MatMul B [K, N]
W_GEMM = RNG.standard_normal((40, 48)).astype(np.float32)  # Gemm B with transB: [N, K]
W_EMB = RNG.standard_normal((30, 64)).astype(np.float32)  # embedding table, also tied to the output projection
W_CONV = RNG.standard_normal((16, 8, 3, 3)).astype(np.float32)


def _model() -> onnx.ModelProto:
    init = [onnx.numpy_helper.from_array(a, n) for a, n in
            [(W_MM, "w_mm"), (W_GEMM, "w_gemm"), (W_EMB, "emb"), (W_CONV, "w_conv"), (np.int64([1, 0]), "perm")]]
    nodes = [
        oh.make_node("Gather", ["emb", "ids"], ["h"], name="embed"),  # [B, 64]
        oh.make_node("MatMul", ["h", "w_mm"], ["m"], name="proj"),  # [B, 48]
        oh.make_node("Gemm", ["m", "w_gemm"], ["g"], name="fc", transB=1),  # [B, 40]
        oh.make_node("Transpose", ["emb"], ["emb_t"], name="tie", perm=[1, 0]),
        oh.make_node("MatMul", ["h", "emb_t"], ["logits"], name="lm_head"),  # [B, 30]
        oh.make_node("Conv", ["img", "w_conv"], ["c"], name="conv", pads=[1, 1, 1, 1]),
    ]
    graph = oh.make_graph(
        nodes, "g",
        [oh.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["B"]),
         oh.make_tensor_value_info("img", onnx.TensorProto.FLOAT, [1, 8, 6, 6])],
        [oh.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("g", "logits", "c")],
        init[:4],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=9)


FEEDS = {"ids": np.array([3, 0, 29, 7], np.int64), "img": RNG.standard_normal((1, 8, 6, 6)).astype(np.float32)}


def _run(model: onnx.ModelProto | ir.Model) -> dict[str, np.ndarray]:
    """onnxruntime without graph optimizations: the graph's own semantics (its QDQ fusions,
    e.g. DequantizeLinear+MatMul -> MatMulNBits at accuracy level 4, quantize activations too)."""
    if isinstance(model, ir.Model):
        model = ir.to_proto(model)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, FEEDS)))


def _conv_numpy(x, w):
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((1, w.shape[0], 6, 6), np.float64)
    for i in range(6):
        for j in range(6):
            out[0, :, i, j] = np.tensordot(w, xp[0, :, i : i + 3, j : j + 3], axes=([1, 2, 3], [0, 1, 2]))
    return out


def _reference(scheme) -> dict[str, np.ndarray]:
    def dq(w, channel_axis, reduce_axis):
        axis, block = (reduce_axis, scheme.block_size) if scheme.bits == 4 else (channel_axis, 0)
        return numerics.dequantize(*numerics.quantize_weight(w, bits=scheme.bits, axis=axis, block_size=block,
                                                             symmetric=scheme.symmetric), axis=axis, block_size=block)

    emb = dq(W_EMB, 0, 1)  # the table is quantized for its Gather (rows), and the tied projection reads it
    h = emb[FEEDS["ids"]].astype(np.float64)
    m = h @ dq(W_MM, 1, 0)
    return {"g": m @ dq(W_GEMM, 0, 1).T, "logits": h @ emb.T, "c": _conv_numpy(FEEDS["img"], dq(W_CONV, 0, 1))}


@pytest.mark.parametrize("text", ["w8", "w4", "w4{block-size=16,symmetric=false}"])
def test_outputs_match_numpy_with_reference_dequantized_weights(text):
    scheme = parse_scheme(text)
    model = ir.from_proto(_model())
    records = weight_only.apply(scheme, model, QuantContext(resolve_target("x86_64-linux-gnu")))
    assert {r.node for r in records} == {"embed", "proj", "fc", "conv"}  # the tied table is one weight
    got, want = _run(model), _reference(scheme)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4, err_msg=name)
    assert {o.name for o in model.graph.outputs} == {"g", "logits", "c"}
    quantized = [v for v in model.graph.initializers.values() if get_quant(v)]
    assert len(quantized) == 4 and all(get_quant(v).bits == scheme.bits for v in quantized)
    assert all(r.bytes_after < r.bytes_before / 3 for r in records)


def test_excluded_nodes_stay_float():
    model = ir.from_proto(_model())
    ctx = QuantContext(resolve_target("x86_64-linux-gnu"), exclude=frozenset({"fc"}))
    records = weight_only.apply(parse_scheme("w8"), model, ctx)
    kept = [r for r in records if r.scheme == "float32"]
    assert [r.node for r in kept] == ["fc"]
    assert "w_gemm" in model.graph.initializers and model.graph.initializers["w_gemm"].const_value.dtype == ir.DataType.FLOAT
    # fc computes with its float weight on the quantized upstream activation
    captured = dict(zip(["m", "g"], ort.InferenceSession(
        _with_outputs(model, ["m"]), providers=["CPUExecutionProvider"]).run(["m", "g"], FEEDS)))
    np.testing.assert_allclose(captured["g"], captured["m"] @ W_GEMM.T, rtol=1e-4, atol=1e-3)


def _with_outputs(model: ir.Model, names: list[str]) -> bytes:
    from passes.quantize.capture import with_outputs

    return with_outputs(model, names)


def test_compiled_artifact_keeps_quant_records(tmp_path):
    from compiler.api import compile

    src = tmp_path / "m.onnx"
    onnx.save(_model(), src)
    art = compile(str(src), output=tmp_path / "out", quantize="w4{block-size=32}")
    saved = ir.load(art.path / "model.onnx")
    records = [get_quant(v) for v in saved.graph.initializers.values() if get_quant(v)]
    # -O1 folds the tied Transpose(emb) into its own initializer: lm_head gets a fifth weight
    assert len(records) == 5 and {r.block_size for r in records} == {32}
    report = art.quantization
    assert report["scheme"] == "w4" and report["model"]["layers_quantized"] == 5
    assert report["model"]["weight_bytes_after"] < 0.25 * report["model"]["weight_bytes_before"]
    assert art.manifest["verification"]["passed"]
    # the artifact's graph computes what the reference does
    got = _run(onnx.load(art.path / "model.onnx"))
    np.testing.assert_allclose(got["g"], _reference(parse_scheme("w4"))["g"], rtol=1e-4, atol=1e-4)
