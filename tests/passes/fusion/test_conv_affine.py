"""fuse-bias and fold-scale-into-weights on Conv / ConvTranspose / Gemm."""

from __future__ import annotations

import pytest

from tests.helpers import op_types
from tests.passes.fusion import const, fuse, model_text, refused

BIAS, SCALE = "fuse-bias", "fold-scale-into-weights"
BOTH = f"{SCALE},{BIAS}"


def conv_then(body: str, inits: list[str], *, pads: str = "<pads=[1,1,1,1]>", out: str = "float[1,4,8,8] y") -> str:
    return model_text(
        "float[1,3,8,8] x",
        out,
        [const("W", [4, 3, 3, 3]), const("B", [4]), *inits],
        f"c = Conv {pads} (x, W, B)\n        {body}",
    )


@pytest.mark.parametrize(
    "body, pipeline",
    [
        ("y = Add(c, k)", BIAS),
        ("y = Add(k, c)", BIAS),
        ("y = Sub(c, k)", BIAS),
        ("y = Sub(k, c)", BIAS),
        ("y = Mul(c, k)", SCALE),
        ("y = Div(c, k)", SCALE),
        ("p = Mul(c, k)\n        y = Add(p, k2)", BOTH),
    ],
)
@pytest.mark.parametrize("shape", [[1, 4, 1, 1], [4, 1, 1], [1]])
def test_affine_after_conv_folds(body, pipeline, shape):
    text = conv_then(body, [const("k", shape, positive=True), const("k2", shape)])
    model, report = fuse(text, pipeline)
    assert report.modified
    assert op_types(model) == ["Conv"]
    assert model.graph[0].outputs[0].name == "y"


def test_chain_of_affines_folds_in_one_walk():
    text = conv_then(
        "p = Mul(c, k)\n        q = Div(p, k)\n        y = Mul(q, k2)",
        [const("k", [4, 1, 1], positive=True), const("k2", [1], positive=True)],
    )
    model, report = fuse(text, SCALE)
    assert op_types(model) == ["Conv"]


def test_conv_without_bias_gets_one():
    text = model_text(
        "float[1,3,8,8] x",
        "float[1,4,6,6] y",
        [const("W", [4, 3, 3, 3]), const("k", [1, 4, 1, 1])],
        "c = Conv(x, W)\n        y = Add(c, k)",
    )
    model, _ = fuse(text, BIAS)
    assert op_types(model) == ["Conv"] and len(model.graph[0].inputs) == 3


def test_conv_transpose_scale_and_bias():
    text = model_text(
        "float[1,4,5,5] x",
        "float[1,6,10,10] y",
        [const("W", [4, 3, 2, 2]), const("k", [6, 1, 1]), const("k2", [1, 6, 1, 1])],
        """c = ConvTranspose <group=2, strides=[2,2]> (x, W)
        p = Mul(c, k)
        y = Sub(p, k2)""",
    )
    model, _ = fuse(text, BOTH)
    assert op_types(model) == ["ConvTranspose"]


# ---------------------------------------------------------------- before the Conv


@pytest.mark.parametrize("group", [1, 2])
def test_scale_before_padded_conv_folds(group):
    text = model_text(
        "float[1,4,8,8] x",
        "float[1,6,8,8] y",
        [const("W", [6, 4 // group, 3, 3]), const("k", [4, 1, 1], positive=True)],
        f"""p = Mul(x, k)
        y = Conv <pads=[1,1,1,1], group={group}> (p, W)""",
    )
    model, _ = fuse(text, SCALE)
    assert op_types(model) == ["Conv"]


def test_normalization_before_unpadded_conv_folds():
    # (x - mean) / std before the first Conv, the usual input normalization.
    text = model_text(
        "float[1,3,8,8] x",
        "float[1,4,6,6] y",
        [const("W", [4, 3, 3, 3]), const("B", [4]), const("mean", [3, 1, 1]), const("std", [1, 3, 1, 1], positive=True)],
        """d = Sub(x, mean)
        n = Div(d, std)
        y = Conv(n, W, B)""",
    )
    model, _ = fuse(text, BOTH)
    assert op_types(model) == ["Conv"]


def test_scale_before_conv_transpose_folds():
    text = model_text(
        "float[1,4,5,5] x",
        "float[1,6,10,10] y",
        [const("W", [4, 3, 2, 2]), const("k", [1, 4, 1, 1], positive=True)],
        """p = Mul(k, x)
        y = ConvTranspose <group=2, strides=[2,2]> (p, W)""",
    )
    model, _ = fuse(text, SCALE)
    assert op_types(model) == ["ConvTranspose"]


# ---------------------------------------------------------------- refusals


def test_add_of_a_full_tensor_is_not_per_channel():
    text = conv_then("y = Add(c, k)", [const("k", [1, 4, 8, 8])])
    assert refused(text, BIAS) == ["the Add constant is not per-channel (it varies along axis -2)"]


def test_add_of_a_non_constant_is_kept():
    text = conv_then("y = Add(c, z)", []).replace("float[1,3,8,8] x", "float[1,3,8,8] x, float[1,4,1,1] z")
    assert refused(text, BIAS) == ["the other Add operand is not constant"]


def test_constant_of_higher_rank_is_kept():
    text = conv_then("y = Mul(c, k)", [const("k", [1, 1, 4, 1, 1])], out="float[1,1,4,8,8] y")
    assert refused(text, SCALE) == ["the Mul constant has rank 5, more than the 4 dims it applies to"]


def test_division_by_zero_is_kept():
    text = conv_then("y = Div(c, k)", [const("k", [4, 1, 1], values=[1, 0, 2, 3])])
    assert refused(text, SCALE) == ["the Div divisor has zeros"]


def test_constant_divided_by_conv_is_kept():
    text = conv_then("y = Div(k, c)", [const("k", [4, 1, 1], positive=True)])
    assert refused(text, SCALE) == ["Div divides a constant by the value (not affine)"]


def test_conv_with_non_constant_bias_is_kept():
    text = model_text(
        "float[1,3,8,8] x, float[4] B",
        "float[1,4,6,6] y",
        [const("W", [4, 3, 3, 3]), const("k", [4, 1, 1])],
        "c = Conv(x, W, B)\n        y = Mul(c, k)",
    )
    assert refused(text, SCALE) == ["Conv bias is not constant"]


def test_add_before_padded_conv_is_kept():
    text = model_text(
        "float[1,3,8,8] x",
        "float[1,4,8,8] y",
        [const("W", [4, 3, 3, 3]), const("k", [3, 1, 1])],
        "p = Add(x, k)\n        y = Conv <pads=[1,1,1,1]> (p, W)",
    )
    assert refused(text, BIAS) == ["Conv pads its input: an added constant does not commute with zero padding"]


def test_scale_that_broadcasts_the_conv_input_is_kept():
    # x has one channel; the Mul broadcasts it to three.
    text = model_text(
        "float[1,1,8,8] x",
        "float[1,4,6,6] y",
        [const("W", [4, 3, 3, 3]), const("k", [3, 1, 1])],
        "p = Mul(x, k)\n        y = Conv(p, W)",
    )
    assert refused(text, SCALE) == ["the Mul input does not have 3 channels (the constant would broadcast it)"]


def test_scale_with_another_user_is_kept():
    text = model_text(
        "float[1,3,8,8] x",
        "float[1,4,6,6] y, float[1,3,8,8] p",
        [const("W", [4, 3, 3, 3]), const("k", [3, 1, 1])],
        "p = Mul(x, k)\n        y = Conv(p, W)",
    )
    assert refused(text, SCALE) == ["Mul output is a graph output"]


def test_quantization_record_blocks_folding():
    from compiler.ir.quant import KEY
    from compiler.passes import parse_pipeline
    from tests.helpers import model_from_text

    text = conv_then("y = Mul(c, k)", [const("k", [4, 1, 1])])
    model = model_from_text(text)
    model.graph.initializers["W"].metadata_props[KEY] = "{}"
    (step,) = parse_pipeline(SCALE)
    report = step.run(model)
    assert not report.modified
    assert report.reasons() == ["Conv weight carries a quantization record"]


# ---------------------------------------------------------------- Gemm


def gemm_text(body: str, inits: list[str], *, attrs: str = "", bias: bool = True, x: str = "float[2,3] x", out: str = "float[2,5] y", weight=(3, 5)) -> str:
    inputs = "x, W, C" if bias else "x, W"
    return model_text(
        x,
        out,
        [const("W", list(weight)), *([const("C", [5])] if bias else []), *inits],
        f"g = Gemm {attrs} ({inputs})\n        {body}",
    )


@pytest.mark.parametrize("attrs, weight", [("", (3, 5)), ("<transB=1, alpha=0.5, beta=3.0>", (5, 3))])
@pytest.mark.parametrize(
    "body, shape, pipeline",
    [
        ("y = Add(g, k)", [5], BIAS),
        ("y = Add(g, k)", [2, 5], BIAS),
        ("y = Add(g, k)", [2, 1], BIAS),
        ("y = Sub(k, g)", [1, 5], BIAS),
        ("y = Mul(g, k)", [1, 5], SCALE),
        ("y = Div(g, k)", [5], SCALE),
    ],
)
def test_affine_after_gemm_folds(attrs, weight, body, shape, pipeline):
    text = gemm_text(body, [const("k", shape, positive=True)], attrs=attrs, weight=weight)
    model, _ = fuse(text, pipeline)
    assert op_types(model) == ["Gemm"]


def test_add_after_gemm_without_bias_becomes_its_bias():
    model, _ = fuse(gemm_text("y = Add(g, k)", [const("k", [5])], bias=False, attrs="<beta=0.0>"), BIAS)
    assert op_types(model) == ["Gemm"]


@pytest.mark.parametrize("attrs, weight, x, shape", [
    ("", (3, 5), "float[2,3] x", [3]),
    ("<transA=1, transB=1, alpha=2.0>", (5, 3), "float[3,2] x", [3, 1]),
])
@pytest.mark.parametrize("op", ["Mul", "Add", "Sub", "Div"])
def test_affine_before_gemm_folds(attrs, weight, x, shape, op):
    text = model_text(
        x,
        "float[2,5] y",
        [const("W", list(weight)), const("C", [5]), const("k", shape, positive=True)],
        f"p = {op}(x, k)\n        y = Gemm {attrs} (p, W, C)",
    )
    pipeline = SCALE if op in ("Mul", "Div") else BIAS
    model, _ = fuse(text, pipeline)
    assert op_types(model) == ["Gemm"]


def test_gemm_add_per_row_with_unknown_rows_is_kept():
    text = gemm_text("y = Add(g, k)", [const("k", [2, 1])], x="float[N,3] x", out="float[N,5] y")
    assert refused(text, BIAS) == ["the Add constant has 2 rows, the Gemm output an unknown number"]


def test_gemm_with_runtime_bias_is_kept():
    text = model_text(
        "float[2,3] x, float[5] C",
        "float[2,5] y",
        [const("W", [3, 5]), const("k", [5])],
        "g = Gemm(x, W, C)\n        y = Mul(g, k)",
    )
    assert refused(text, SCALE) == ["Gemm bias C is not constant"]


def test_per_row_scale_after_gemm_is_kept():
    text = gemm_text("y = Mul(g, k)", [const("k", [2, 1])])
    assert refused(text, SCALE) == ["the Mul constant is not per-channel (it varies along axis -2)"]
