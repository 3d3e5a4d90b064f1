"""fuse-batchnorm: BatchNormalization folded into Conv / ConvTranspose / Gemm / MatMul."""

from __future__ import annotations

import pytest

from tests.helpers import op_types
from tests.passes.fusion import const, fuse, model_text, refused, rule_report

PASS = "fuse-batchnorm"


def bn_inits(channels: int, prefix: str = "") -> list[str]:
    return [
        const(f"{prefix}s", [channels], positive=True),
        const(f"{prefix}b", [channels]),
        const(f"{prefix}m", [channels]),
        const(f"{prefix}v", [channels], positive=True),
    ]


def conv_bn(*, bias: bool = True, extra_out: str = "", extra_body: str = "", attrs: str = "<pads=[1,1,1,1]>") -> str:
    inits = [const("W", [4, 3, 3, 3]), *bn_inits(4)] + ([const("B", [4])] if bias else [])
    conv_inputs = "x, W, B" if bias else "x, W"
    return model_text(
        "float[1,3,8,8] x",
        "float[1,4,8,8] y" + extra_out,
        inits,
        f"""c = Conv {attrs} ({conv_inputs})
        y = BatchNormalization(c, s, b, m, v)
        {extra_body}""",
    )


@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn_folds(bias):
    model, report = fuse(conv_bn(bias=bias), PASS)
    assert report.modified
    assert op_types(model) == ["Conv"]
    conv = model.graph[0]
    assert conv.outputs[0].name == "y"  # the graph output keeps its name
    assert len(conv.inputs) == 3 and conv.inputs[2].const_value is not None
    # Old weights do not linger; the new weight kept its name.
    assert set(model.graph.initializers) == {"W", "B"} if bias else {"W", "W_bias"}


def test_grouped_conv_bn_folds():
    text = model_text(
        "float[2,4,6,6] x",
        "float[2,6,6,6] y",
        [const("W", [6, 2, 3, 3]), *bn_inits(6)],
        """c = Conv <group=2, pads=[1,1,1,1]> (x, W)
        y = BatchNormalization <epsilon=0.001> (c, s, b, m, v)""",
    )
    model, _ = fuse(text, PASS)
    assert op_types(model) == ["Conv"]


def test_conv_transpose_bn_folds_with_groups():
    text = model_text(
        "float[1,4,5,5] x",
        "float[1,6,10,10] y",
        [const("W", [4, 3, 2, 2]), const("B", [6]), *bn_inits(6)],
        """c = ConvTranspose <group=2, strides=[2,2]> (x, W, B)
        y = BatchNormalization(c, s, b, m, v)""",
    )
    model, _ = fuse(text, PASS)
    assert op_types(model) == ["ConvTranspose"]


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_bn_folds(trans_b):
    weight = [5, 3] if trans_b else [3, 5]
    text = model_text(
        "float[2,3] x",
        "float[2,5] y",
        [const("W", weight), const("C", [5]), *bn_inits(5)],
        f"""c = Gemm <transB={trans_b}, alpha=0.5, beta=2.0> (x, W, C)
        y = BatchNormalization(c, s, b, m, v)""",
    )
    model, _ = fuse(text, PASS)
    assert op_types(model) == ["Gemm"]


def test_matmul_bn_becomes_gemm():
    text = model_text(
        "float[2,3] x",
        "float[2,5] y",
        [const("W", [3, 5]), *bn_inits(5)],
        """c = MatMul(x, W)
        y = BatchNormalization(c, s, b, m, v)""",
    )
    model, _ = fuse(text, PASS)
    assert op_types(model) == ["Gemm"]


def test_bn_old_opset_attributes():
    text = model_text(
        "float[1,3,8,8] x",
        "float[1,4,8,8] y",
        [const("W", [4, 3, 3, 3]), *bn_inits(4)],
        """c = Conv(x, W)
        y = BatchNormalization <spatial=1> (c, s, b, m, v)""",
        header='<ir_version: 3, opset_import: ["" : 7]>',
    ).replace("float[1,4,8,8] y", "float[1,4,6,6] y")
    model, _ = fuse(text, PASS)
    # IR 3 has no free initializers: the folded weights are Constant nodes.
    assert op_types(model) == ["Constant", "Constant", "Conv"]
    assert refused(text.replace("spatial=1", "spatial=0"), PASS) == [
        "BatchNormalization normalizes per activation (spatial=0)"
    ]
    old = text.replace('"" : 7', '"" : 6').replace("<spatial=1>", "<is_test=0>")
    assert refused(old, PASS) == ["BatchNormalization is in training mode (is_test=0)"]


# ---------------------------------------------------------------- refusals


def test_conv_output_with_another_user_is_kept():
    text = conv_bn(extra_out=", float[1,4,8,8] z", extra_body="z = Relu(c)")
    assert refused(text, PASS) == ["Conv output has another user"]


def test_conv_output_that_is_a_graph_output_is_kept():
    text = conv_bn().replace("=> (float[1,4,8,8] y)", "=> (float[1,4,8,8] y, float[1,4,8,8] c)")
    assert refused(text, PASS) == ["Conv output is a graph output"]


def test_training_mode_bn_is_kept():
    text = conv_bn().replace("BatchNormalization(", "BatchNormalization <training_mode=1> (")
    assert refused(text, PASS) == ["BatchNormalization is in training mode (training_mode=1)"]


def test_non_constant_weight_is_kept():
    text = model_text(
        "float[1,3,8,8] x, float[4,3,3,3] W",
        "float[1,4,6,6] y",
        bn_inits(4),
        """c = Conv(x, W)
        y = BatchNormalization(c, s, b, m, v)""",
    )
    assert refused(text, PASS) == ["Conv weight is not constant"]


def test_non_constant_statistics_are_kept():
    text = model_text(
        "float[1,3,8,8] x, float[4] m",
        "float[1,4,6,6] y",
        [const("W", [4, 3, 3, 3]), const("s", [4]), const("b", [4]), const("v", [4], positive=True)],
        """c = Conv(x, W)
        y = BatchNormalization(c, s, b, m, v)""",
    )
    assert refused(text, PASS) == ["BatchNormalization mean is not constant"]


def test_shared_weight_is_kept():
    text = model_text(
        "float[1,3,8,8] x",
        "float[1,4,6,6] y, float[1,4,6,6] z",
        [const("W", [4, 3, 3, 3]), *bn_inits(4)],
        """c = Conv(x, W)
        y = BatchNormalization(c, s, b, m, v)
        z = Conv(x, W)""",
    )
    assert refused(text, PASS) == ["Conv weight is shared with another node"]


def test_matmul_bn_with_3d_input_is_kept():
    text = model_text(
        "float[2,4,3] x",
        "float[2,4,5] y",
        [const("W", [3, 5]), *bn_inits(4)],
        """c = MatMul(x, W)
        y = BatchNormalization(c, s, b, m, v)""",
    )
    assert refused(text, PASS) == ["MatMul input A has rank 3; Gemm takes 2-D inputs"]


def test_report_names_rule_and_node():
    text = conv_bn(extra_out=", float[1,4,8,8] z", extra_body="z = Relu(c)").replace(
        "y = BatchNormalization", "y = BatchNormalization"
    )
    report, _ = rule_report(text, PASS)
    (refusal,) = report.refused
    assert refusal.rule == "conv-batchnorm" and refusal.reason == "Conv output has another user"


# ---------------------------------------------------------------- BatchNormalization absorbs what follows


def pre_activation_block(body: str, inits: list[str] = (), out: str = "float[1,4,6,6] y") -> str:
    # BatchNormalization after a Concat (densenet's pre-activation blocks): no Conv to fold into.
    return model_text(
        "float[1,2,6,6] a1, float[1,2,6,6] a2",
        out,
        [*bn_inits(4), *inits],
        f"x = Concat <axis=1> (a1, a2)\n        n = BatchNormalization(x, s, b, m, v)\n        {body}",
    )


def test_scale_and_shift_after_bn_fold_into_it():
    text = pre_activation_block(
        "p = Mul(n, k)\n        q = Add(p, t)\n        y = Relu(q)",
        [const("k", [4, 1, 1]), const("t", [4, 1, 1])],
    )
    model, report = fuse(text, "fold-scale-into-weights,fuse-bias")
    assert op_types(model) == ["Concat", "BatchNormalization", "Relu"]


def test_scale_after_bn_with_shared_scale_is_kept():
    text = pre_activation_block(
        "y = Mul(n, k)\n        z = Mul(s, k1)",
        [const("k", [4, 1, 1]), const("k1", [4])],
        out="float[1,4,6,6] y, float[4] z",
    )
    assert refused(text, "fold-scale-into-weights") == ["BatchNormalization scale is shared with another node"]


def test_full_tensor_after_bn_is_kept():
    text = pre_activation_block("y = Add(n, t)", [const("t", [1, 4, 6, 6])])
    assert refused(text, "fuse-bias") == ["the Add constant is not per-channel (it varies along axis -2)"]
