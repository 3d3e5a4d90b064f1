"""fuse-matmul-add, and the MatMul scale rules of fold-scale-into-weights."""

from __future__ import annotations

import pytest

from tests.helpers import op_types
from tests.passes.fusion import const, fuse, model_text, refused

PASS = "fuse-matmul-add"
SCALE = "fold-scale-into-weights"


@pytest.mark.parametrize("bias_shape", [[5], [1, 5], [2, 5], [2, 1], [1]])
@pytest.mark.parametrize("swap", [False, True])
def test_matmul_add_becomes_gemm(bias_shape, swap):
    add = "y = Add(k, m)" if swap else "y = Add(m, k)"
    text = model_text(
        "float[2,3] x",
        "float[2,5] y",
        [const("W", [3, 5]), const("k", bias_shape)],
        f"m = MatMul(x, W)\n        {add}",
    )
    model, report = fuse(text, PASS)
    assert report.modified
    assert op_types(model) == ["Gemm"]
    assert model.graph[0].outputs[0].name == "y"


def test_runtime_weight_and_bias_become_gemm():
    text = model_text(
        "float[N,3] x, float[3,5] w, float[5] b",
        "float[N,5] y",
        [],
        "m = MatMul(x, w)\n        y = Add(m, b)",
    )
    model, _ = fuse(text, PASS)
    assert op_types(model) == ["Gemm"]


def test_matmul_add_inside_a_chain_uses_inferred_shapes():
    text = model_text(
        "float[2,3] x",
        "float[2,5] y",
        [const("W", [3, 5]), const("k", [5])],
        "r = Relu(x)\n        m = MatMul(r, W)\n        a = Add(m, k)\n        y = Relu(a)",
    )
    model, _ = fuse(text, PASS)
    assert op_types(model) == ["Relu", "Gemm", "Relu"]
    # Inferred shapes were only borrowed: the intermediate keeps what it had.
    assert model.graph[0].outputs[0].shape is None


def test_nd_matmul_add_is_kept():
    text = model_text(
        "float[2,4,3] x",
        "float[2,4,5] y",
        [const("W", [3, 5]), const("k", [5])],
        "m = MatMul(x, W)\n        y = Add(m, k)",
    )
    assert refused(text, PASS) == ["MatMul input A has rank 3; Gemm takes 2-D inputs"]


def test_bias_that_widens_the_output_is_kept():
    text = model_text(
        "float[2,3] x",
        "float[3,2,5] y",
        [const("W", [3, 5]), const("k", [3, 1, 5])],
        "m = MatMul(x, W)\n        y = Add(m, k)",
    )
    assert refused(text, PASS) == ["bias shape [3, 1, 5] does not broadcast to the Gemm output [2, 5]"]


def test_matmul_with_another_user_is_kept():
    text = model_text(
        "float[2,3] x",
        "float[2,5] y, float[2,5] m",
        [const("W", [3, 5]), const("k", [5])],
        "m = MatMul(x, W)\n        y = Add(m, k)",
    )
    assert refused(text, PASS) == ["MatMul output is a graph output"]


def test_integer_matmul_is_kept():
    text = model_text(
        "int32[2,3] x",
        "int32[2,5] y",
        [const("W", [3, 5], dtype="int32", values=range(15)), const("k", [5], dtype="int32", values=range(5))],
        "m = MatMul(x, W)\n        y = Add(m, k)",
    )
    assert refused(text, PASS) == ["Gemm is not used for dtype INT32"]


# ---------------------------------------------------------------- MatMul scales


@pytest.mark.parametrize("shape", [[5], [1, 1, 5], [1]])
def test_scale_after_nd_matmul_folds(shape):
    text = model_text(
        "float[2,4,3] x",
        "float[2,4,5] y",
        [const("W", [3, 5]), const("k", shape, positive=True)],
        "m = MatMul(x, W)\n        y = Div(m, k)",
    )
    model, _ = fuse(text, SCALE)
    assert op_types(model) == ["MatMul"]


@pytest.mark.parametrize("shape", [[3], [1, 1, 3]])
def test_scale_before_nd_matmul_folds(shape):
    text = model_text(
        "float[2,4,3] x",
        "float[2,4,5] y",
        [const("W", [3, 5]), const("k", shape, positive=True)],
        "p = Mul(x, k)\n        y = MatMul(p, W)",
    )
    model, _ = fuse(text, SCALE)
    assert op_types(model) == ["MatMul"]


def test_per_row_scale_after_matmul_is_kept():
    text = model_text(
        "float[2,4,3] x",
        "float[2,4,5] y",
        [const("W", [3, 5]), const("k", [4, 1])],
        "m = MatMul(x, W)\n        y = Mul(m, k)",
    )
    assert refused(text, SCALE) == ["the Mul constant is not per-channel (it varies along axis -2)"]


def test_scale_after_matmul_with_runtime_weight_is_kept():
    text = model_text(
        "float[2,3] x, float[3,5] w",
        "float[2,5] y",
        [const("k", [5])],
        "m = MatMul(x, w)\n        y = Mul(m, k)",
    )
    assert refused(text, SCALE) == ["MatMul weight (input B) is not constant"]


def test_bias_computed_from_the_product_is_kept():
    # Fusing would make the Gemm read a value computed from its own output (a cycle).
    text = model_text(
        "float[2,3] x",
        "float[2,5] y",
        [const("W", [3, 5])],
        "m = MatMul(x, W)\n        r = Relu(m)\n        y = Add(m, r)",
    )
    assert refused(text, PASS) == ["MatMul output has another user"]
