"""all-MiniLM-L6-v2 (real weights) quantized by ``int8-dynamic`` and ``w8`` through ``compiler.compile``:
mean sentence-embedding cosine vs float32 over 256 held-out sentences stays >= 0.99.

(Static ``int8`` on MiniLM is tested with the static scheme.)
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
from tests import model_zoo, text_data

SEQ, BATCH, SENTENCES = 32, 16, 256
MIN_COSINE = 0.99


def _session(model, *, optimize: bool = True, optimized_path=None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _hidden(session: ort.InferenceSession, feeds) -> list[np.ndarray]:
    return [session.run(None, feed)[0] for feed in feeds]


def _cosines(session, feeds, reference) -> np.ndarray:
    return np.concatenate([text_data.embedding_cosine(ref, out, feed["attention_mask"])
                           for ref, out, feed in zip(reference, _hidden(session, feeds), feeds)])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return model_zoo.minilm(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def evaluation():
    """256 sentences the calibration never saw, as 16 batches of 16 x 32 tokens."""
    return text_data.feeds(SENTENCES, batch=BATCH, seq=SEQ, start=text_data.HELD_OUT)


@pytest.fixture(scope="module")
def float_hidden(source, evaluation):
    return _hidden(_session(source), evaluation)


@pytest.fixture(scope="module")
def int8_dynamic(source, tmp_path_factory):
    folder = tmp_path_factory.mktemp("int8-dynamic")
    npz = text_data.write_npz(folder / "calibration.npz", 16, seq=SEQ)  # --calibration: the report's figures
    return compiler.compile(str(source), output=folder / "out", opt_level=2, quantize="int8-dynamic",
                            calibration=str(npz))


@pytest.fixture(scope="module")
def w8(source, tmp_path_factory):
    # the ONNX backend re-encodes w8 weight reads (targets/onnx/encode_int8.py), so the compile's own
    # check against the quantized IR holds; the accuracy is measured below, on real sentences
    return compiler.compile(str(source), output=tmp_path_factory.mktemp("w8") / "out", opt_level=2, quantize="w8")


def test_int8_dynamic_keeps_sentence_embeddings(int8_dynamic, evaluation, float_hidden, tmp_path):
    cos = _cosines(_session(int8_dynamic.path / "model.onnx", optimized_path=tmp_path / "ort.onnx"),
                   evaluation, float_hidden)
    assert cos.mean() >= MIN_COSINE, f"mean cosine {cos.mean():.5f}"
    # every matmul runs on integers: onnxruntime fused the canonical form into its dynamic-quantization kernels
    fused = Counter(n.op_type for n in onnx.load(str(tmp_path / "ort.onnx")).graph.node)
    assert fused["DynamicQuantizeMatMul"] + fused["MatMulIntegerToFloat"] == 36, fused
    assert fused["MatMulInteger"] == 0


def test_int8_dynamic_report_and_size(int8_dynamic, source):
    report = json.loads((int8_dynamic.path / "quantization.json").read_text())
    ops = Counter((layer["op"], layer["scheme"]) for layer in report["layers"])
    assert ops == {("MatMul", "int8-dynamic"): 36, ("Gather", "int8-dynamic"): 3}
    emitted = onnx.load(str(int8_dynamic.path / "model.onnx"))
    assert Counter(n.op_type for n in emitted.graph.node)["MatMulInteger"] == 36
    assert (int8_dynamic.path / "model.onnx").stat().st_size < 0.3 * source.stat().st_size
    assert int8_dynamic.manifest["verification"].get("passed") is True


def test_w8_keeps_sentence_embeddings(w8, evaluation, float_hidden, source):
    cos = _cosines(_session(w8.path / "model.onnx"), evaluation, float_hidden)
    assert cos.mean() >= MIN_COSINE, f"mean cosine {cos.mean():.5f}"
    assert (w8.path / "model.onnx").stat().st_size < 0.3 * source.stat().st_size


def test_int8_weight_encoding_is_the_canonical_math_without_matmulnbits(source, evaluation, tmp_path):
    """targets/onnx/encode_int8: the re-encoded w8 model computes what the canonical DequantizeLinear form
    computes (onnxruntime with no graph optimizations), and onnxruntime no longer turns it into MatMulNBits
    or dequantizes the embedding table on every run."""
    from passes.quantize import weight_only
    from passes.quantize.core import QuantContext
    from passes.quantize.schemes import parse_scheme
    from targets.onnx.encode_int8 import encode_int8_weights

    model = ir.load(source)
    weight_only.apply(parse_scheme("w8"), model, QuantContext(spec=None))
    canonical = ir.to_proto(model)
    assert Counter(n.op_type for n in _optimized(canonical, tmp_path / "a.onnx"))["MatMulNBits"] == 36  # the problem

    report = encode_int8_weights(model)
    assert (report.folded_weights, report.gathered_tables, report.kept) == (36, 3, [])
    encoded = ir.to_proto(model)
    assert [o.name for o in encoded.graph.output] == [o.name for o in canonical.graph.output]
    ops = Counter(n.op_type for n in _optimized(encoded, tmp_path / "b.onnx"))
    assert ops["MatMulNBits"] == ops["DequantizeLinear"] == 0, ops

    feeds = evaluation[:2]
    want = _hidden(_session(canonical, optimize=False), feeds)
    got = _hidden(_session(encoded), feeds)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(np.abs(w).max()))


def _optimized(proto: onnx.ModelProto, path) -> list:
    _session(proto, optimized_path=path)
    return list(onnx.load(str(path)).graph.node)
