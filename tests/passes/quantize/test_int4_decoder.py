"""int4 decoders end to end: w4 / gptq-w4 / awq-w4 on LLaMA, Qwen2 and GPT-2 style models,
and their MatMulNBits / GatherBlockQuantized encoding for onnxruntime.

The encoded artifact must compute what the canonical QDQ model means (onnxruntime
without graph optimizations: its own DQ->MatMul fusion would quantize activations).
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import onnxruntime as ort
import pytest

from compiler.ir.quant import get_quant
from passes.quantize import awq, gptq, numerics, weight_only
from passes.quantize.calibration import CalibrationSet
from passes.quantize.core import QuantContext
from passes.quantize.schemes import parse_scheme
from targets.onnx import emit as emit_onnx
from targets.onnx.encode import encode_int4, matmulnbits_arrays, pack_nibbles, wants_int4_contrib
from targets.triple import resolve_target
from tests import transformer_models as tm

SPEC = resolve_target("x86_64-linux-gnu")
VOCAB = 512
#: big enough that every projection and embedding spans whole int4 blocks
SIZES = {
    "llama": {"hidden_size": 128, "intermediate_size": 256, "vocab_size": VOCAB},
    "qwen2": {"hidden_size": 128, "intermediate_size": 256, "vocab_size": VOCAB},
    "gpt2": {"n_embd": 128, "vocab_size": VOCAB},
}
IMPLEMENTATIONS = {"w4": weight_only, "gptq-w4": gptq, "awq-w4": awq}
CALIBRATION = [tm.make_feeds(2, 16, vocab=VOCAB, seed=s) for s in range(6)]
HELD_OUT = tm.make_feeds(2, 12, vocab=VOCAB, seed=101)


def _session(model: ir.Model | onnx.ModelProto, optimize: bool = True) -> ort.InferenceSession:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _run(model, feeds, optimize: bool = True) -> np.ndarray:
    return _session(model, optimize).run(None, feeds)[0]


@pytest.fixture(scope="module")
def float_decoders() -> dict[str, onnx.ModelProto]:
    """Each arch exported and optimized at -O2 (what the quantize stage receives)."""
    from compiler.passes import PassManager, opt_level_pipeline

    out = {}
    for arch, sizes in SIZES.items():
        model = ir.load(tm.export(arch, config=sizes))
        PassManager(opt_level_pipeline(2)).run(model)
        out[arch] = ir.to_proto(model)
    return out


@pytest.fixture(scope="module")
def quantized(float_decoders) -> dict[tuple[str, str], onnx.ModelProto]:
    """Every (arch, scheme) in canonical QDQ form."""
    calib = CalibrationSet.from_feeds(CALIBRATION)
    out = {}
    for arch, proto in float_decoders.items():
        for name, module in IMPLEMENTATIONS.items():
            model = ir.from_proto(proto)
            module.apply(parse_scheme(name), model, QuantContext(spec=SPEC, calibration=calib))
            out[arch, name] = ir.to_proto(model)
    return out


CASES = [(arch, scheme) for arch in SIZES for scheme in IMPLEMENTATIONS]


@pytest.mark.parametrize(("arch", "scheme"), CASES)
def test_artifact_is_small_runs_and_matches_the_canonical_form(tmp_path, float_decoders, quantized, arch, scheme):
    canonical = quantized[arch, scheme]
    model = ir.from_proto(canonical)
    result = emit_onnx(model, SPEC, tmp_path)
    artifact = onnx.load(str(tmp_path / result.entry))
    fp32_bytes = float_decoders[arch].ByteSize()
    assert (tmp_path / result.entry).stat().st_size <= 0.2 * fp32_bytes

    ops = [n.op_type for n in artifact.graph.node]
    dq_readers = _dq_readers(canonical)
    assert "DequantizeLinear" not in ops
    assert ops.count("MatMulNBits") == sum(1 for op in dq_readers if op in ("MatMul", "Gemm")) > 0
    assert ops.count("GatherBlockQuantized") == dq_readers.count("Gather") == (2 if arch == "gpt2" else 1)
    assert result.extra["int4_encoding"]["MatMulNBits"] == ops.count("MatMulNBits")

    expected = _run(canonical, HELD_OUT, optimize=False)
    got = _run(artifact, HELD_OUT)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=2e-5)
    # and it is still an int4 model of the float one, not something else that happens to agree
    reference = _run(float_decoders[arch], HELD_OUT)
    assert numerics.cosine(got, reference) > 0.9


def _dq_readers(proto: onnx.ModelProto) -> list[str]:
    """Op types reading the output of an int4 DequantizeLinear."""
    int4 = {t.name for t in proto.graph.initializer if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)}
    outs = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int4}
    return [n.op_type for n in proto.graph.node for i in n.input if i in outs]


def test_packed_weights_keep_their_quant_record(tmp_path, quantized):
    model = ir.from_proto(quantized["llama", "gptq-w4"])
    encode_int4(model)
    packed = [v for v in model.graph.initializers.values() if get_quant(v) is not None]
    blobs = [v for v in packed if v.const_value.dtype == ir.DataType.UINT8]
    assert blobs and all(get_quant(v).packing == "nibble-lo-first" and get_quant(v).bits == 4 for v in blobs)
    assert all(get_quant(v).scheme == "gptq-w4" for v in blobs)
    # the embedding table is read by GatherBlockQuantized as it is: still int4, unpacked
    tables = [v for v in packed if v.const_value.dtype == ir.DataType.INT4]
    assert len(tables) == 1 and get_quant(tables[0]).packing == "none"


def test_accuracy_level_4_is_what_onnxruntime_makes_of_the_canonical_form(quantized):
    """onnxruntime fuses DQ->MatMul into MatMulNBits at accuracy level 4 by itself; encoding at 4 gives the same."""
    canonical = quantized["llama", "w4"]
    model = ir.from_proto(canonical)
    encode_int4(model, accuracy_level=4)
    np.testing.assert_allclose(_run(model, HELD_OUT), _run(canonical, HELD_OUT), rtol=1e-6, atol=1e-6)
    exact = _run(canonical, HELD_OUT, optimize=False)
    assert not np.allclose(_run(model, HELD_OUT), exact, rtol=1e-4, atol=2e-5)  # int8 activations: not the QDQ math


def test_targets_without_the_encoding_keep_qdq(tmp_path, quantized):
    no_contrib = dataclasses.replace(SPEC, onnx_runtime_contrib=False)
    no_nbits = dataclasses.replace(SPEC, quant_encodings=("qdq",))
    assert wants_int4_contrib(SPEC) and not wants_int4_contrib(no_contrib) and not wants_int4_contrib(no_nbits)
    for i, spec in enumerate((no_contrib, no_nbits)):
        folder = tmp_path / str(i)
        folder.mkdir()
        result = emit_onnx(ir.from_proto(quantized["qwen2", "w4"]), spec, folder)
        ops = {n.op_type for n in onnx.load(str(folder / result.entry)).graph.node}
        assert "DequantizeLinear" in ops and not ops & {"MatMulNBits", "GatherBlockQuantized"}
        assert "int4_encoding" not in result.extra


# ------------------------------------------------------------ the encodings, one node at a time


def _blocked_weight(k: int, n: int, block: int, symmetric: bool, seed: int = 0):
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    q, scale, zero = numerics.quantize_weight(w, bits=4, axis=0, block_size=block, symmetric=symmetric)
    return q, scale, zero


def _qdq_matmul_model(q, scale, zero, block: int, symmetric: bool, *, gemm: bool = False) -> ir.Model:
    """x [M, K] @ DequantizeLinear(q [K, N] int4/uint4, blocked along K);
    with ``gemm``, Gemm(x, DQ(qᵀ), bias, transB=1)."""
    storage = ml_dtypes.int4 if symmetric else ml_dtypes.uint4
    if gemm:
        q, scale, zero = q.T, scale.T, None if zero is None else zero.T
    axis = 1 if gemm else 0
    inits = [onnx.numpy_helper.from_array(q.astype(storage), "q"), onnx.numpy_helper.from_array(scale, "s")]
    dq_inputs = ["q", "s"]
    if zero is not None:
        inits.append(onnx.numpy_helper.from_array(zero.astype(storage), "z"))
        dq_inputs.append("z")
    k = q.shape[1] if gemm else q.shape[0]
    n = q.shape[0] if gemm else q.shape[1]
    nodes = [oh.make_node("DequantizeLinear", dq_inputs, ["w"], name="dq", axis=axis, block_size=block)]
    if gemm:
        inits.append(onnx.numpy_helper.from_array(np.linspace(-1, 1, n).astype(np.float32), "bias"))
        nodes.append(oh.make_node("Gemm", ["x", "w", "bias"], ["y"], name="mm", transB=1))
    else:
        nodes.append(oh.make_node("MatMul", ["x", "w"], ["y"], name="mm"))
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["M", k])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    return ir.from_proto(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gemm", [False, True])
def test_matmulnbits_computes_the_dequantized_matmul(symmetric, gemm):
    k, n, block = 80, 24, 32  # K not a multiple of the block (padding), 3 blocks (odd: half-filled zero-point byte)
    q, scale, zero = _blocked_weight(k, n, block, symmetric)
    model = _qdq_matmul_model(q, scale, zero, block, symmetric, gemm=gemm)
    report = encode_int4(model)
    assert report.matmulnbits == 1 and [nd.op_type for nd in model.graph] == ["MatMulNBits"]
    x = np.random.default_rng(1).standard_normal((5, k)).astype(np.float32)
    expected = x @ numerics.dequantize(q, scale, zero, axis=0, block_size=block)
    if gemm:
        expected = expected + np.linspace(-1, 1, n).astype(np.float32)
    np.testing.assert_allclose(_run(model, {"x": x}), expected, rtol=1e-5, atol=1e-5)


def test_matmulnbits_layout():
    """B [N, K/B, B/2], element 2i in the low nibble; symmetric codes offset by 8; zero points packed alike."""
    codes = np.array([[-8, 7, 0, -1] * 4], dtype=np.int8)  # N=1, K=16
    blob, scales, zeros = matmulnbits_arrays(codes, np.array([[0.5]], np.float32), None, 16)
    assert blob.shape == (1, 1, 8) and zeros is None and scales.shape == (1, 1)
    assert blob[0, 0, 0] == (0 | (15 << 4)) and blob[0, 0, 1] == (8 | (7 << 4))
    unsigned = np.arange(16, dtype=np.uint8)[None, :].repeat(2, 0)
    blob, _, zeros = matmulnbits_arrays(unsigned, np.ones((2, 1), np.float32), np.array([[3], [12]], np.uint8), 16)
    assert blob[1, 0, 0] == 0x10 and zeros.tolist() == [[3], [12]]
    assert pack_nibbles(np.array([1, 2, 3, 4], np.uint8)).tolist() == [0x21, 0x43]


@pytest.mark.parametrize("symmetric", [True, False])
def test_gather_block_quantized_gathers_dequantized_rows(symmetric):
    vocab, dim, block = 20, 64, 32
    table = np.random.default_rng(2).standard_normal((vocab, dim)).astype(np.float32)
    q, scale, zero = numerics.quantize_weight(table, bits=4, axis=1, block_size=block, symmetric=symmetric)
    storage = ml_dtypes.int4 if symmetric else ml_dtypes.uint4
    inits = [onnx.numpy_helper.from_array(q.astype(storage), "q"), onnx.numpy_helper.from_array(scale, "s")]
    if zero is not None:
        inits.append(onnx.numpy_helper.from_array(zero.astype(storage), "z"))
    nodes = [oh.make_node("DequantizeLinear", [t.name for t in inits], ["table"], name="dq", axis=1, block_size=block),
             oh.make_node("Gather", ["table", "ids"], ["h"], name="embed")]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2, 3])],
                          [oh.make_tensor_value_info("h", onnx.TensorProto.FLOAT, None)], inits)
    model = ir.from_proto(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10))
    assert encode_int4(model).gather_block_quantized == 1
    assert [nd.op_type for nd in model.graph] == ["GatherBlockQuantized"]
    ids = np.array([[0, 19, 5], [5, 7, 1]], np.int64)
    expected = numerics.dequantize(q, scale, zero, axis=1, block_size=block)[ids]
    np.testing.assert_allclose(_run(model, {"ids": ids}), expected, rtol=1e-6, atol=1e-6)


def test_weights_blocked_along_the_wrong_axis_stay_qdq():
    """A MatMul weight blocked along N (not the reduction) has no MatMulNBits form: left alone, with the reason."""
    w = np.random.default_rng(3).standard_normal((32, 64)).astype(np.float32)
    q, scale, _ = numerics.quantize_weight(w, bits=4, axis=1, block_size=32, symmetric=True)
    inits = [onnx.numpy_helper.from_array(q.astype(ml_dtypes.int4), "q"), onnx.numpy_helper.from_array(scale, "s")]
    nodes = [oh.make_node("DequantizeLinear", ["q", "s"], ["w"], name="dq", axis=1, block_size=32),
             oh.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 32])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    model = ir.from_proto(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10))
    report = encode_int4(model)
    assert report.matmulnbits == 0 and "output axis" in report.kept[0]
    assert [nd.op_type for nd in model.graph] == ["DequantizeLinear", "MatMul"]
