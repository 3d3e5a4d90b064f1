"""int4 weights lower to packed storage read by fused kernels: `kiln compile decoder.onnx --quantize w4
--emit tvm` is at most 0.2x the fp32 artifact and computes what onnxruntime computes on the same quantized
IR. Plus the packing itself, and w8 / the generic dequantize path."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import compiler
from compiler.importers.onnx_file import import_onnx
from compiler.passes import PassManager, opt_level_pipeline
from passes.quantize.schemes import parse_scheme
from passes.quantize.stage import quantize_model
from targets.triple import resolve_target
from targets.tvm import quant
from tests import model_zoo as mz
from tests import transformer_models as tm

from .helpers import assert_matches, kiln, kiln_run, ort_run

#: big enough that weights, not code, dominate the artifact (about 10 M parameters)
DECODER = {"hidden_size": 512, "intermediate_size": 1408, "num_attention_heads": 8, "num_key_value_heads": 4,
           "vocab_size": 4096}


def _total_bytes(art) -> int:
    return sum(f["bytes"] for f in art.manifest["files"] if f["path"] != "quantization.json")


def _quantized_ir(source, scheme: str) -> bytes:
    """The quantized IR the driver builds from: -O1 (as for --emit tvm), then the scheme, then dead code."""
    model, _ = import_onnx(str(source))
    PassManager(opt_level_pipeline(1, contrib=False, gpu=False)).run(model)
    quantize_model(model, parse_scheme(scheme), resolve_target("x86_64-linux-gnu"))
    PassManager("eliminate-dead").run(model)
    return ir.to_proto(model).SerializeToString()


@pytest.mark.slow
def test_w4_decoder_is_packed_small_and_matches_the_quantized_ir(tmp_path):
    source = tm.export("llama", config=DECODER)
    fp32 = compiler.compile(str(source), emit="tvm", output=tmp_path / "fp32", verify=False)
    proc = kiln("compile", str(source), "--quantize", "w4", "--emit", "tvm", "-o", str(tmp_path / "w4"))
    assert proc.returncode == 0, proc.stderr
    w4 = compiler.load_artifact(tmp_path / "w4")
    assert w4.manifest["verification"]["passed"]
    packed = w4.manifest["backend"]["quantized"]
    assert packed["QMatMul"] == 2 * 7 + 1 and packed["QGather"] == 1 and packed["QDequantize"] == 0
    ratio = _total_bytes(w4) / _total_bytes(fp32)
    assert ratio <= 0.2, ratio
    inputs = tm.make_feeds(2, 13, vocab=DECODER["vocab_size"], seed=5)
    expected = ort_run(_quantized_ir(source, "w4"), inputs, optimize=False)
    assert_matches(expected, kiln_run(w4.path, inputs, tmp_path))


@pytest.mark.parametrize("scheme", ["w8", "w4{symmetric=false}"])
def test_other_weight_schemes_match_the_quantized_ir(tmp_path, zoo_dir, scheme):
    source = mz.export("qwen2", zoo_dir)
    art = compiler.compile(str(source), emit="tvm", output=tmp_path / "art", quantize=scheme)
    assert art.manifest["backend"]["quantized"]["QMatMul"] > 0
    inputs = mz.sample_inputs("qwen2")
    expected = ort_run(_quantized_ir(source, scheme), inputs, optimize=False)
    assert_matches(expected, art.run(inputs))


def test_conv_weights_dequantize_at_run_time(tmp_path):
    """w8 on a CNN: Conv reads its int8 weight through QDequantize; no float copy is stored."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[3] / "examples" / "models" / "tiny_cnn.onnx"
    art = compiler.compile(str(example), emit="tvm", output=tmp_path / "art", quantize="w8", params="external")
    assert art.manifest["backend"]["quantized"]["QDequantize"] >= 1
    assert art.manifest["verification"]["passed"]
    names = art.manifest["backend"]["params"]["names"]
    assert any(n.endswith(".q8") for n in names)


@pytest.mark.parametrize(("bits", "signed"), [(4, True), (4, False), (8, True), (8, False)])
def test_pack_unpack_round_trip(bits, signed):
    rng = np.random.default_rng(0)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    codes = rng.integers(lo, hi + 1, size=(5, 33)).astype(np.int16)
    packed = quant.pack_codes(codes, bits, signed)
    if bits == 4:
        assert packed.dtype == np.uint8 and packed.shape == (5, 17)
    np.testing.assert_array_equal(quant.unpack_codes(packed, bits, signed, 33), codes)
