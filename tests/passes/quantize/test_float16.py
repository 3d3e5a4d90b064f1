"""fp16 / bf16: onnxruntime on the converted model against onnxruntime on the float32 original.

Error bounds come from the format, not from a run: a result that went through
``d`` roundings to a format with unit roundoff ``u`` (2**-11 for float16,
2**-8 for bfloat16) is off by about ``d * u`` relative to its scale, where
``d`` is the number of rounding ops on the model's longest path: every
float-producing node in the compute form, every weight reader in the
storage-only form (compute stays float32 there).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest
from onnx import TensorProto

from passes.quantize import float16
from passes.quantize.calibration import CalibrationSet
from passes.quantize.core import QuantContext
from passes.quantize.schemes import parse_scheme
from targets.triple import resolve_target
from tests.helpers import io_signature, run_ort, run_passes

CPU = resolve_target("x86_64-linux-gnu")  # lists neither float16 nor bfloat16: storage-only
GPU = resolve_target("x86_64-linux-gnu", "cuda:sm_90")  # lists both: compute form
UNIT_ROUNDOFF = {"fp16": 2.0**-11, "bf16": 2.0**-8}


# --------------------------------------------------------------------------- models


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.asarray(array, np.float32), name)


def cnn_proto() -> onnx.ModelProto:
    """Conv-Relu-Conv-BatchNorm-Relu-GlobalAveragePool-Gemm-Softmax on 2x3x16x16 images."""
    rng = np.random.default_rng(0)
    inits = [
        _init("w1", rng.normal(0, 0.3, (16, 3, 3, 3))), _init("b1", rng.normal(0, 0.1, 16)),
        _init("w2", rng.normal(0, 0.1, (32, 16, 3, 3))), _init("b2", rng.normal(0, 0.1, 32)),
        _init("scale", rng.uniform(0.5, 1.5, 32)), _init("shift", rng.normal(0, 0.1, 32)),
        _init("mean", rng.normal(0, 0.1, 32)), _init("var", rng.uniform(0.5, 1.5, 32)),
        _init("fc_w", rng.normal(0, 0.3, (32, 10))), _init("fc_b", rng.normal(0, 0.1, 10)),
    ]
    nodes = [
        oh.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        oh.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        oh.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"),
        oh.make_node("BatchNormalization", ["c2", "scale", "shift", "mean", "var"], ["bn"], name="bn"),
        oh.make_node("Relu", ["bn"], ["r2"], name="relu2"),
        oh.make_node("GlobalAveragePool", ["r2"], ["pool"], name="pool"),
        oh.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        oh.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc"),
        oh.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="softmax"),
    ]
    graph = oh.make_graph(nodes, "cnn", [oh.make_tensor_value_info("image", TensorProto.FLOAT, [2, 3, 16, 16])],
                          [oh.make_tensor_value_info("probs", TensorProto.FLOAT, [2, 10])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def overflow_proto() -> onnx.ModelProto:
    """x @ W1 (|.| <= 1), * 1e4, * 1e4 (up to 1e8: beyond float16), reshape, / 1e8, + b, @ W2.

    The Reshape matters on this host: onnxruntime's CPU provider computes float16 Mul and Div in float32
    between Casts it inserts and fuses, so the overflow shows only where a value is materialized in
    float16, as in a Reshape (it has a float16 kernel); a float16 device materializes every value.
    """
    rng = np.random.default_rng(1)
    inits = [_init("w1", rng.uniform(-1, 1, (32, 32)) / 32), _init("w2", rng.normal(0, 0.2, (32, 32))),
             _init("big", np.array(1e4)), _init("down", np.array(1e8)), _init("b", rng.normal(0, 0.1, 32)),
             onnx.numpy_helper.from_array(np.array([4, 32], np.int64), "shape")]
    nodes = [
        oh.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        oh.make_node("Mul", ["h", "big"], ["h4"], name="up1"),
        oh.make_node("Mul", ["h4", "big"], ["h8"], name="up2"),
        oh.make_node("Reshape", ["h8", "shape"], ["h8r"], name="reshape"),
        oh.make_node("Div", ["h8r", "down"], ["back"], name="down"),
        oh.make_node("Add", ["back", "b"], ["biased"], name="bias"),
        oh.make_node("MatMul", ["biased", "w2"], ["y"], name="mm2"),
    ]
    graph = oh.make_graph(nodes, "overflow", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def islands_proto() -> onnx.ModelProto:
    """MatMul -> Exp -> Relu -> Neg -> Exp -> MatMul: the Relu and Neg between the two Exp islands join them."""
    rng = np.random.default_rng(2)
    inits = [_init("w1", rng.normal(0, 0.1, (32, 32))), _init("w2", rng.normal(0, 0.1, (32, 32)))]
    nodes = [
        oh.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
        oh.make_node("Exp", ["a"], ["e1"], name="exp1"),
        oh.make_node("Relu", ["e1"], ["r"], name="relu"),
        oh.make_node("Neg", ["r"], ["n"], name="neg"),
        oh.make_node("Exp", ["n"], ["e2"], name="exp2"),
        oh.make_node("MatMul", ["e2", "w2"], ["y"], name="mm2"),
    ]
    graph = oh.make_graph(nodes, "islands", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def llama_proto() -> onnx.ModelProto:
    from compiler.passes import opt_level_pipeline
    from tests import transformer_models

    model = ir.load(transformer_models.export("llama"))
    run_passes(model, opt_level_pipeline(2))  # what the quantize stage sees
    return ir.to_proto(model)


def llama_feeds(seed: int = 0) -> dict[str, np.ndarray]:
    from tests import transformer_models

    return transformer_models.make_feeds(2, 7, seed=seed)


def cnn_feeds(seed: int = 0) -> dict[str, np.ndarray]:
    return {"image": np.random.default_rng(seed).normal(0, 1, (2, 3, 16, 16)).astype(np.float32)}


# --------------------------------------------------------------------------- helpers


def convert(proto: onnx.ModelProto, scheme: str, spec, typed: bool = False, **ctx) -> tuple[ir.Model, list]:
    """The converted model and its records; ``typed`` runs infer-types first (as -O1 and up do)."""
    model = ir.from_proto(proto)
    if typed:
        run_passes(model, "infer-types")
    records = float16.apply(parse_scheme(scheme), model, QuantContext(spec=spec, **ctx))
    return model, records


def rounding_depth(proto: onnx.ModelProto, storage: bool) -> int:
    """Rounding ops on the longest path: float-producing nodes (compute), readers of a stored weight (storage)."""
    model = ir.from_proto(proto)
    run_passes(model, "infer-types")
    depth: dict[str, int] = {}
    for node in model.graph:
        before = max((depth.get(v.name, 0) for v in node.inputs if v is not None), default=0)
        if storage:
            rounds = any(v is not None and v.const_value is not None and v.const_value.size >= float16.MIN_ELEMENTS
                         and v.dtype == ir.DataType.FLOAT for v in node.inputs)
        else:
            rounds = any(v.dtype == ir.DataType.FLOAT for v in node.outputs)
        for out in node.outputs:
            depth[out.name] = before + int(rounds)
    return max(depth[o.name] for o in model.graph.outputs)


def assert_close_to_float(original: onnx.ModelProto, model: ir.Model, feeds, scheme: str, storage: bool) -> None:
    want = run_ort(original, feeds)
    got = run_ort(model, feeds)
    allowed = rounding_depth(original, storage) * UNIT_ROUNDOFF[scheme]
    for w, g in zip(want, got):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert np.all(np.isfinite(g))
        error = float(np.max(np.abs(g.astype(np.float64) - w))) / float(np.max(np.abs(w)))
        assert error <= allowed, f"relative error {error:.2e} > {allowed:.2e}"


def assert_contract(original: onnx.ModelProto, model: ir.Model) -> None:
    """Graph I/O unchanged, every node output name kept, types consistent, no Casts that cancel."""
    before = ir.from_proto(original)
    assert io_signature(model) == io_signature(before)
    names = {o.name for n in model.graph for o in n.outputs}
    assert {o.name for n in before.graph for o in n.outputs} <= names
    onnx.shape_inference.infer_shapes(ir.to_proto(model), check_type=True, strict_mode=True)
    assert not cancelling_casts(model)


def cancelling_casts(model: ir.Model) -> list[str]:
    """Casts whose input is a Cast from the type they cast back to (float32 -> low -> float32 or back)."""
    found = []
    for node in model.graph:
        source = node.inputs[0].producer() if node.op_type == "Cast" else None
        if source is not None and source.op_type == "Cast" and source.inputs[0].dtype is not None \
                and source.inputs[0].dtype.value == node.attributes.get_int("to"):
            found.append(node.name)
    return found


def dtype_of(model: ir.Model, name: str) -> ir.DataType:
    for node in model.graph:
        for out in node.outputs:
            if out.name == name:
                return out.dtype
    raise KeyError(name)


def weight_ratio(records) -> float:
    converted = [r for r in records if r.scheme != "float32"]
    return sum(r.bytes_after for r in converted) / sum(r.bytes_before for r in converted)


def initializer_bytes(model: ir.Model | onnx.ModelProto) -> int:
    model = ir.from_proto(model) if isinstance(model, onnx.ModelProto) else model
    return sum(v.const_value.nbytes for v in model.graph.initializers.values())


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("spec", [CPU, GPU], ids=["storage", "compute"])
def test_cnn_fp16(spec):
    original = cnn_proto()
    model, records = convert(original, "fp16", spec)
    assert_contract(original, model)
    assert_close_to_float(original, model, cnn_feeds(1), "fp16", storage=spec is CPU)
    assert weight_ratio(records) == 0.5
    assert initializer_bytes(model) <= 0.55 * initializer_bytes(original)  # biases and BN vectors stay small
    compute = {o.dtype for n in model.graph if n.op_type in ("Conv", "Gemm") for o in n.outputs}
    if spec is CPU:  # storage only: nothing but the weights and their Casts is float16
        low = [n.op_type for n in model.graph if n.op_type != "Cast" and any(
            v is not None and v.dtype == ir.DataType.FLOAT16 for v in [*n.inputs, *n.outputs])]
        assert low == []
    else:
        assert compute == {ir.DataType.FLOAT16}
    if spec is GPU:
        assert dtype_of(model, "probs") == ir.DataType.FLOAT  # softmax input precision: an island


@pytest.mark.parametrize("spec", [CPU, GPU], ids=["storage", "compute"])
def test_llama_fp16(llama_proto, spec):
    model, records = convert(llama_proto, "fp16", spec)
    assert_contract(llama_proto, model)
    assert_close_to_float(llama_proto, model, llama_feeds(3), "fp16", storage=spec is CPU)
    assert weight_ratio(records) == 0.5
    assert initializer_bytes(model) <= 0.52 * initializer_bytes(llama_proto)
    if spec is GPU:
        ops = {}
        for node in model.graph:
            for out in node.outputs:
                ops.setdefault(node.op_type, set()).add(out.dtype)
        assert ops["Softmax"] == {ir.DataType.FLOAT}
        assert ops["Pow"] == {ir.DataType.FLOAT}  # the RMSNorm square stays in range
        assert ir.DataType.FLOAT16 in ops["MatMul"]
        # the float32 minimum of the attention mask would be -inf in float16: its Where stays float32
        where = [n for n in model.graph if n.op_type == "Where" and n.outputs[0].dtype in
                 (ir.DataType.FLOAT, ir.DataType.FLOAT16)]
        assert where and all(n.outputs[0].dtype == ir.DataType.FLOAT for n in where)


def test_llama_fp16_with_calibration(llama_proto):
    calibration = CalibrationSet.from_feeds([llama_feeds(seed) for seed in (5, 6)])
    model, _ = convert(llama_proto, "fp16", GPU, calibration=calibration)
    assert_contract(llama_proto, model)
    assert_close_to_float(llama_proto, model, llama_feeds(7), "fp16", storage=False)


def test_overflow_region_becomes_a_float32_island():
    original = overflow_proto()
    rng = np.random.default_rng(3)
    feeds = lambda: {"x": rng.uniform(-1, 1, (4, 32)).astype(np.float32)}  # noqa: E731
    calibration = CalibrationSet.from_feeds([feeds() for _ in range(4)])
    model, _ = convert(original, "fp16", GPU, calibration=calibration)
    assert_contract(original, model)
    evaluation = feeds()
    assert_close_to_float(original, model, evaluation, "fp16", storage=False)
    # the value beyond 65504 is produced and read in float32; the MatMuls around it run in float16
    assert [dtype_of(model, name) for name in ("h8", "h8r", "back")] == [ir.DataType.FLOAT] * 3
    assert dtype_of(model, "h") == ir.DataType.FLOAT16 and dtype_of(model, "y") == ir.DataType.FLOAT
    # without calibration nothing shows that h4 * 1e4 leaves the range: no island, and float16 overflows
    blind, _ = convert(original, "fp16", GPU)
    assert dtype_of(blind, "h8") == ir.DataType.FLOAT16
    assert not np.all(np.isfinite(run_ort(blind, evaluation)[0]))


def test_huge_constant_keeps_its_readers_float32_without_calibration():
    original = overflow_proto()
    for init in original.graph.initializer:
        if init.name == "big":
            init.CopyFrom(_init("big", np.array(1e5)))  # beyond float16 by itself
        if init.name == "down":
            init.CopyFrom(_init("down", np.array(1e10)))
    model, _ = convert(original, "fp16", GPU)
    assert_contract(original, model)
    assert dtype_of(model, "h4") == ir.DataType.FLOAT and dtype_of(model, "h8") == ir.DataType.FLOAT
    feeds = {"x": np.random.default_rng(4).uniform(-1, 1, (4, 32)).astype(np.float32)}
    assert_close_to_float(original, model, feeds, "fp16", storage=False)


def test_adjacent_islands_merge():
    original = islands_proto()
    rng = np.random.default_rng(5)
    feeds = [{"x": rng.normal(0, 1, (4, 32)).astype(np.float32)} for _ in range(3)]
    # measured ranges (without them, Exp outputs are presumed beyond float16 and so are their readers)
    model, _ = convert(original, "fp16", GPU, calibration=CalibrationSet.from_feeds(feeds[:2]))
    assert_contract(original, model)
    # Relu and Neg between the Exp islands stay float32: casting them down and back up would add two Casts
    computed_in = {n.name: n.outputs[0].dtype for n in model.graph}
    assert [computed_in[name] for name in ("mm1", "exp1", "relu", "neg", "exp2", "mm2")] == [
        ir.DataType.FLOAT16, ir.DataType.FLOAT, ir.DataType.FLOAT, ir.DataType.FLOAT, ir.DataType.FLOAT,
        ir.DataType.FLOAT16]
    assert dtype_of(model, "y") == ir.DataType.FLOAT  # the graph output: a Cast of mm2's renamed output
    # x down, a up, e2 down, y up (to the float32 graph output)
    assert sum(n.op_type == "Cast" for n in model.graph) == 4
    assert_close_to_float(original, model, feeds[2], "fp16", storage=False)


@pytest.mark.parametrize("spec", [CPU, GPU], ids=["storage", "compute"])
def test_excluded_nodes_stay_float32(spec):
    original = cnn_proto()
    model, records = convert(original, "fp16", spec, typed=True, exclude=frozenset({"conv2", "relu1"}))
    assert_contract(original, model)
    conv2 = next(n for n in model.graph if n.name == "conv2")
    assert [v.dtype for v in conv2.inputs] == [ir.DataType.FLOAT] * 3
    assert conv2.inputs[1].name == "w2"  # the float32 weight itself, no Cast of a float16 copy
    assert dtype_of(model, "r1") == ir.DataType.FLOAT
    by_weight = {r.weight: r for r in records if r.weight}
    assert by_weight["w2"].scheme == "float32" and by_weight["w2"].bytes_after == by_weight["w2"].bytes_before
    assert by_weight["w1"].scheme == "fp16"
    assert any(r.node == "relu1" and r.scheme == "float32" for r in records)
    assert_close_to_float(original, model, cnn_feeds(2), "fp16", storage=spec is CPU)


@pytest.mark.parametrize("spec", [CPU, GPU], ids=["storage", "compute"])
def test_weight_shared_with_an_excluded_node_is_kept_in_both_forms(spec):
    rng = np.random.default_rng(6)
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "w"], ["a"], name="kept"), oh.make_node("MatMul", ["a", "w"], ["y"], name="low")],
        "shared", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])], [_init("w", rng.normal(0, 0.2, (32, 32)))])
    original = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model, records = convert(original, "fp16", spec, exclude=frozenset({"kept"}))
    assert_contract(original, model)
    kept = next(n for n in model.graph if n.name == "kept")
    assert kept.inputs[1].name == "w" and kept.inputs[1].dtype == ir.DataType.FLOAT
    stored = {v.dtype for v in model.graph.initializers.values()}
    assert stored == {ir.DataType.FLOAT, ir.DataType.FLOAT16}
    assert records[0].bytes_after == 32 * 32 * (4 + 2)
    assert_close_to_float(original, model, {"x": rng.normal(0, 1, (4, 32)).astype(np.float32)}, "fp16",
                          storage=spec is CPU)


@pytest.mark.parametrize("name", ["cnn", "llama"])
def test_bf16_storage_runs_in_onnxruntime(name, llama_proto):
    original, feeds = (cnn_proto(), cnn_feeds(3)) if name == "cnn" else (llama_proto, llama_feeds(8))
    model, records = convert(original, "bf16", CPU)
    assert_contract(original, model)
    assert {v.dtype for v in model.graph.initializers.values()} >= {ir.DataType.BFLOAT16}
    assert_close_to_float(original, model, feeds, "bf16", storage=True)
    assert weight_ratio(records) == 0.5


def test_bf16_compute_form_is_well_typed(llama_proto):
    """onnxruntime's CPU provider has no bfloat16 kernels: the compute form is for devices that list bfloat16."""
    model, _ = convert(llama_proto, "bf16", GPU)
    assert_contract(llama_proto, model)
    matmuls = {n.outputs[0].dtype for n in model.graph if n.op_type == "MatMul"}
    assert ir.DataType.BFLOAT16 in matmuls
    assert all(v.dtype != ir.DataType.FLOAT16 for n in model.graph for v in n.outputs)
    assert not float16.runs_on_cpu_provider(parse_scheme("bf16"), GPU)
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):  # what runs_on_cpu_provider tells the caller
        run_ort(model, llama_feeds())
    assert float16.runs_on_cpu_provider(parse_scheme("bf16"), CPU)
    assert float16.runs_on_cpu_provider(parse_scheme("fp16"), GPU)


def test_reduced_count_decides_long_reductions():
    fmt = float16.FORMATS["float16"]
    assert fmt.reduction_limit == 128 and float16.FORMATS["bfloat16"].reduction_limit == 16
    # a float16 running sum of ones stalls at 2048 = 2**11: why long reductions stay float32
    assert float(np.add.accumulate(np.ones(4096, np.float16), dtype=np.float16)[-1]) == 2048
    x = ir.Value(name="x", shape=ir.Shape([2, 64, 300]), type=ir.TensorType(ir.DataType.FLOAT))
    short = ir.Node("", "ReduceMean", [x], [ir.AttrInt64s("axes", [1])], num_outputs=1)
    long = ir.Node("", "ReduceMean", [x], [ir.AttrInt64s("axes", [1, 2])], num_outputs=1)
    assert float16.reduced_count(short) == 64 and float16._sensitivity(short, fmt) is None
    assert float16.reduced_count(long) == 64 * 300 and float16._sensitivity(long, fmt) == "long reduction"


def test_compile_with_fp16(tmp_path):
    """End to end: the artifact keeps its float32 signature, halves its weights and passes kiln's verification."""
    import compiler

    path = tmp_path / "cnn.onnx"
    onnx.save(cnn_proto(), path)
    for device in ("cpu", "cuda"):
        art = compiler.compile(str(path), output=tmp_path / device, device=device, opt_level=2, quantize="fp16")
        assert art.manifest["verification"]["passed"]
        report = json.loads((art.path / "quantization.json").read_text())
        assert report["scheme"] == "fp16" and report["model"]["size_ratio"] <= 0.55
        feeds = cnn_feeds(4)
        got = art.run(feeds)["probs"]
        want = run_ort(cnn_proto(), feeds)[0]
        assert got.dtype == np.float32
        allowed = rounding_depth(cnn_proto(), storage=device == "cpu") * UNIT_ROUNDOFF["fp16"]
        assert np.max(np.abs(got - want)) / np.max(np.abs(want)) <= allowed
