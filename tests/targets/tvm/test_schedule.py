"""kiln's default CPU schedule (targets/tvm/schedule.py) computes what onnxruntime computes on the shapes
that pick each of its tile shapes: tiles of rows within one image row, tiles of whole image rows (7x7,
13x13 outputs), strided and depthwise convolutions with unrolled taps, column counts no vector divides,
a matrix-vector product, and a softmax over one row (a reduction to one value)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import compiler
from targets.tvm import _env

from .helpers import assert_matches, ort_run

TARGETS = ["x86_64-linux-gnu"] + ([] if _env.missing_cpu_features(["+avx2", "+fma"]) else ["x86-avx2"])

#: (height/width, in channels, out channels, kernel, stride, groups)
CONVS = {
    "pointwise-7x7": (7, 192, 96, 1, 1, 1),  # whole image rows: 7 rows a tile
    "pointwise-14x14": (14, 40, 48, 1, 1, 1),  # 14 = 2 x 7: tiles inside an image row
    "conv3x3-13x13": (13, 16, 24, 3, 1, 1),  # 13 rows a tile
    "conv3x3-stride2": (15, 8, 16, 3, 2, 1),
    "depthwise-5x5": (14, 24, 24, 5, 1, 24),
    "depthwise-3x3-stride2": (16, 32, 32, 3, 2, 32),
    "odd-columns": (9, 8, 20, 3, 1, 1),  # 20 output channels: no whole AVX2 vector pair divides them
    "stem": (32, 3, 16, 3, 2, 1),
}


def _conv_model(size: int, cin: int, cout: int, k: int, stride: int, groups: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((cout, cin // groups, k, k)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "b")
    lo = numpy_helper.from_array(np.array(0, np.float32), "lo")
    hi = numpy_helper.from_array(np.array(6, np.float32), "hi")
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[k, k], strides=[stride, stride],
                         pads=[k // 2] * 4, group=groups),
        helper.make_node("Clip", ["c", "lo", "hi"], ["y"]),  # ReLU6: fused into the tile's write-back
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, size, size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "conv", [x], [y], [weight, bias, lo, hi])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _gemm_softmax_model(rows: int, k: int, n: int) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    weight = numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"]), helper.make_node("Softmax", ["g"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight, bias])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _check(model: onnx.ModelProto, target: str, tmp_path, rtol: float = 1e-3, atol: float = 1e-4) -> None:
    source = tmp_path / "model.onnx"
    onnx.save(model, source)
    art = compiler.compile(str(source), target=target, emit="tvm", output=tmp_path / "art", verify=False)
    inputs = art.random_inputs(seed=3)
    assert_matches(ort_run(source, inputs), art.run(inputs), rtol=rtol, atol=atol)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", sorted(CONVS))
def test_convolution_tiles_match_onnxruntime(tmp_path, case, target):
    _check(_conv_model(*CONVS[case]), target, tmp_path)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("rows", [1, 7])
def test_gemm_and_one_row_softmax_match_onnxruntime(tmp_path, rows, target):
    # one row: a matrix-vector product, and a softmax whose reductions produce one value each
    _check(_gemm_softmax_model(rows, 96, 1000), target, tmp_path, atol=1e-6)
