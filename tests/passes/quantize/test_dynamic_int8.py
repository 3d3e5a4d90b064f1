"""int8-dynamic against a numpy reference of dynamic int8 quantization, run by onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.ir.quant import get_quant
from passes.quantize import dynamic_int8
from passes.quantize.core import QuantContext
from passes.quantize.schemes import parse_scheme
from tests.helpers import op_types

K, N, M_GEMM, N_GEMM = 64, 48, 6, 40
SCHEME = parse_scheme("int8-dynamic")


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "W1": rng.normal(0, 0.2, (K, N)).astype(np.float32),
        "W2": rng.normal(0, 0.05, (K, N)).astype(np.float32),
        "b2": rng.normal(0, 0.1, (N,)).astype(np.float32),
        "W3": rng.normal(0, 0.3, (N_GEMM, K)).astype(np.float32),  # Gemm transB=1: [N, K]
        "C3": rng.normal(0, 0.1, (N_GEMM,)).astype(np.float32),
        "W4": rng.normal(0, 0.2, (K, N)).astype(np.float32),
        "Wsmall": rng.normal(0, 0.2, (K, 2)).astype(np.float32),  # below MIN_ELEMENTS: never quantized
    }


def _model() -> onnx.ModelProto:
    """x feeds three MatMuls (one shared activation) and a tiny one; a feeds a Gemm with alpha/beta."""
    w = _weights()
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["y1"], name="mm1"),
        helper.make_node("MatMul", ["x", "W2"], ["h2"], name="mm2"),
        helper.make_node("Add", ["h2", "b2"], ["y2"], name="bias2"),
        helper.make_node("Gemm", ["a", "W3", "C3"], ["y3"], name="gemm", transB=1, alpha=0.5, beta=2.0),
        helper.make_node("MatMul", ["x", "W4"], ["y4"], name="mm_kept"),
        helper.make_node("MatMul", ["x", "Wsmall"], ["y5"], name="mm_small"),
    ]
    graph = helper.make_graph(
        nodes, "dyn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5, K]),
         helper.make_tensor_value_info("a", TensorProto.FLOAT, [M_GEMM, K])],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, ["batch", 5, N]),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["batch", 5, N]),
         helper.make_tensor_value_info("y3", TensorProto.FLOAT, [M_GEMM, N_GEMM]),
         helper.make_tensor_value_info("y4", TensorProto.FLOAT, ["batch", 5, N]),
         helper.make_tensor_value_info("y5", TensorProto.FLOAT, ["batch", 5, 2])],
        [numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _feeds(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(0, 1, (2, 5, K)).astype(np.float32), "a": rng.normal(0.5, 2, (M_GEMM, K)).astype(np.float32)}


# ----------------------------------------------------------------------------- numpy reference


def dynamic_quantize_linear(x: np.ndarray) -> tuple[np.ndarray, np.float32, np.uint8]:
    """ONNX DynamicQuantizeLinear: uint8, range widened to include 0, round half to even."""
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = np.float32((hi - lo) / 255.0)
    zero = np.uint8(np.clip(np.rint(0.0 - lo / scale), 0, 255))
    q = np.clip(np.rint(x / scale) + zero, 0, 255).astype(np.uint8)
    return q, scale, zero


def int8_per_column(w_kn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column: scale = absmax / 127."""
    scale = (np.abs(w_kn).max(axis=0) / 127.0).astype(np.float32)
    return np.clip(np.rint(w_kn / scale), -127, 127).astype(np.int8), scale


def reference_matmul(x: np.ndarray, w_kn: np.ndarray, bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(exact, avx2): dynamic int8 matmul with exact integer accumulation, and as x86 CPUs without VNNI compute it.

    Without VNNI, onnxruntime's u8 x s8 GEMM (MLAS, VPMADDUBSW) adds the products of
    each pair of adjacent K indices in int16 with saturation before widening, so an
    output whose pair sum leaves [-32768, 32767] comes out clipped. The second array
    models that; it equals the first wherever no pair saturates.
    """
    xq, xs, xz = dynamic_quantize_linear(x)
    wq, ws = int8_per_column(w_kn)
    a = xq.reshape(-1, xq.shape[-1]).astype(np.int64)
    w = wq.astype(np.int64)
    exact = (a - int(xz)) @ w
    pairs = a[:, 0::2, None] * w[0::2][None] + a[:, 1::2, None] * w[1::2][None]  # K even here
    clipped = np.clip(pairs, -32768, 32767).sum(axis=1) - int(xz) * w.sum(axis=0)
    out = []
    for acc in (exact, clipped):
        y = acc.reshape(*x.shape[:-1], -1).astype(np.float32) * (xs * ws)
        out.append(y if bias is None else y + bias)
    return out[0], out[1]


def reference(feeds: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    w = _weights()
    x, a = feeds["x"], feeds["a"]
    y2 = reference_matmul(x, w["W2"])
    return {
        "y1": reference_matmul(x, w["W1"]),
        "y2": (y2[0] + w["b2"], y2[1] + w["b2"]),
        "y3": reference_matmul(a, 0.5 * w["W3"].T, 2.0 * w["C3"]),
    }


def assert_matches_reference(got: np.ndarray, want: tuple[np.ndarray, np.ndarray], name: str) -> None:
    """Every element equals the exact reference, or (only where a pair saturates) the AVX2 one; and
    saturation touches few elements, so this is an exact comparison almost everywhere."""
    exact, avx2 = want
    tol = dict(rtol=1e-5, atol=1e-5 * float(np.abs(exact).max()))
    ok = np.isclose(got, exact, **tol) | np.isclose(got, avx2, **tol)
    assert ok.all(), f"{name}: {int((~ok).sum())} of {ok.size} elements match neither reference"
    differs = ~np.isclose(exact, avx2, **tol)
    assert differs.mean() < 0.1, f"{name}: saturation would touch {differs.mean():.0%} of the outputs"


# ----------------------------------------------------------------------------- helpers


def _quantized(exclude=("mm_kept",)) -> tuple[ir.Model, list]:
    model = ir.from_proto(_model())
    records = dynamic_int8.apply(SCHEME, model, QuantContext(spec=None, exclude=frozenset(exclude)))
    return model, records


def _run(model: ir.Model | onnx.ModelProto, feeds, optimize: bool = True, optimized_path=None) -> dict[str, np.ndarray]:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("optimize", [False, True], ids=["unfused", "onnxruntime-fused"])
def test_matches_numpy_reference(optimize, tmp_path):
    model, _ = _quantized()
    feeds = _feeds()
    got = _run(model, feeds, optimize=optimize, optimized_path=tmp_path / "opt.onnx")
    for name, want in reference(feeds).items():
        assert_matches_reference(got[name], want, name)
    if optimize:  # the canonical form is what onnxruntime fuses into its dynamic-quantization kernels
        fused = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
        assert "MatMulInteger" not in fused
        assert {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"} & set(fused)


def test_reference_differs_from_float():
    """The reference is not the float model: dynamic int8 error is visible (the comparison above means something)."""
    feeds = _feeds()
    floats = _run(_model(), feeds)
    exact = reference(feeds)["y1"][0]
    assert not np.allclose(floats["y1"], exact, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(floats["y1"], exact, atol=0.05 * np.abs(floats["y1"]).max())


def test_structure_names_and_records():
    before = _model()
    model, records = _quantized()
    by_node = {r.node: r for r in records}
    assert set(by_node) == {"mm1", "mm2", "gemm", "mm_kept"}  # mm_small has too few weights to record
    for name in ("mm1", "mm2", "gemm"):
        assert by_node[name].scheme == "int8-dynamic"
        assert 0 < by_node[name].bytes_after < by_node[name].bytes_before / 3
    assert by_node["mm_kept"].scheme == "float32" and "accuracy budget" in by_node["mm_kept"].note
    # every record names the output of the node it stands for, and that value still exists under that name
    original_outputs = {n.name: n.output[0] for n in before.graph.node}
    values = {o.name for n in model.graph for o in n.outputs}
    for r in records:
        assert r.output == original_outputs[r.node] and r.output in values
    # the integer matmul carries the quantized node's name; excluded and tiny MatMuls are untouched
    nodes = {n.name: n for n in model.graph}
    assert nodes["mm1"].op_type == nodes["mm2"].op_type == nodes["gemm"].op_type == "MatMulInteger"
    assert nodes["mm_kept"].op_type == "MatMul" and nodes["mm_small"].op_type == "MatMul"
    assert nodes["mm_kept"].inputs[1].name == "W4" and nodes["mm_small"].inputs[1].name == "Wsmall"
    ops = op_types(model)
    assert ops.count("DynamicQuantizeLinear") == 2  # x is quantized once for mm1 and mm2, a once for the Gemm
    assert ops.count("MatMulInteger") == 3 and "Gemm" not in ops
    # the quantized float weights are gone; int8 codes carry their QuantRecord
    assert not {"W1", "W2", "W3"} & set(model.graph.initializers)
    for node in (nodes["mm1"], nodes["gemm"]):
        wq = node.inputs[1]
        rec = get_quant(wq)
        assert wq.const_value.dtype == ir.DataType.INT8 and list(wq.const_value.shape) == [K, node.outputs[0].shape[-1] if node is nodes["mm1"] else N_GEMM]
        assert (rec.bits, rec.axis, rec.block_size, rec.symmetric) == (8, 1, 0, True)
    # graph inputs and outputs: same names, dtypes, order
    proto = ir.to_proto(model)
    assert [(v.name, v.type.tensor_type.elem_type) for v in proto.graph.input] == \
        [(v.name, v.type.tensor_type.elem_type) for v in before.graph.input]
    assert [(v.name, v.type.tensor_type.elem_type) for v in proto.graph.output] == \
        [(v.name, v.type.tensor_type.elem_type) for v in before.graph.output]
    onnx.checker.check_model(proto, full_check=True)


def test_kept_nodes_compute_exactly_the_float_model():
    model, _ = _quantized()
    feeds = _feeds()
    got, floats = _run(model, feeds), _run(_model(), feeds)
    np.testing.assert_array_equal(got["y4"], floats["y4"])
    np.testing.assert_array_equal(got["y5"], floats["y5"])


def test_excluding_everything_changes_nothing():
    model, records = _quantized(exclude=("mm1", "mm2", "gemm", "mm_kept"))
    assert all(r.scheme == "float32" for r in records)
    assert op_types(model) == [n.op_type for n in _model().graph.node]


def test_conv_stays_float_with_a_note():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.2, (16, 8, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], "c",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 6, 6])], [numpy_helper.from_array(w, "w")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    records = dynamic_int8.apply(SCHEME, model, QuantContext(spec=None))
    assert [(r.node, r.scheme) for r in records] == [("conv", "float32")]
    assert "Conv" in records[0].note and "float" in records[0].note
    assert op_types(model) == ["Conv"]


def test_compile_end_to_end(tmp_path):
    """kiln compile --quantize int8-dynamic: an artifact onnxruntime runs, with its quantization report."""
    import compiler

    src = tmp_path / "m.onnx"
    onnx.save(_model(), src)
    feeds = _feeds()
    art = compiler.compile(str(src), output=tmp_path / "out", opt_level=2, quantize="int8-dynamic",
                           calibration=[feeds])
    report = json.loads((art.path / "quantization.json").read_text())
    assert report["scheme"] == "int8-dynamic"
    schemes = {layer["node"]: layer["scheme"] for layer in report["layers"]}
    assert schemes["mm1"] == schemes["gemm"] == "int8-dynamic"
    emitted = onnx.load(str(art.path / "model.onnx"))
    assert "MatMulInteger" in {n.op_type for n in emitted.graph.node}
    outputs = art.run(feeds)
    for name, want in reference(feeds).items():
        assert_matches_reference(outputs[name], want, name)
