"""fuse-conv-activation: Conv (+ Add) + activation → com.microsoft::FusedConv (contrib only)."""

from __future__ import annotations

import pytest

from tests.helpers import model_from_text, op_types, random_feeds, run_ort, snapshot
from tests.passes.fusion import ATOL, RTOL, const, fuse, model_text, refused, rule_report

PASS = "fuse-conv-activation{contrib=true}"


def conv_act(act: str, *, inits: list[str] = (), out: str = "float[1,4,8,8] y", x: str = "float[1,3,8,8] x", conv: str = "Conv <pads=[1,1,1,1]> (x, W, B)") -> str:
    return model_text(
        x,
        out,
        [const("W", [4, 3, 3, 3]), const("B", [4]), *inits],
        f"c = {conv}\n        {act}",
    )


@pytest.mark.parametrize(
    "act, inits",
    [
        ("y = Relu(c)", []),
        ("y = Tanh(c)", []),
        ("y = Sigmoid(c)", []),
        ("y = LeakyRelu <alpha=0.2> (c)", []),
        ("y = HardSigmoid <alpha=0.3, beta=0.4> (c)", []),
        ("y = Clip(c, lo, hi)", [const("lo", [], values=[-0.5]), const("hi", [], values=[0.7])]),
        ("y = Clip(c, lo)", [const("lo", [], values=[0.1])]),
    ],
)
def test_activation_fuses(act, inits):
    text = conv_act(act, inits=inits)
    model, report = fuse(text, PASS)
    assert report.modified
    (node,) = model.graph
    assert (node.domain, node.op_type) == ("com.microsoft", "FusedConv")
    assert node.outputs[0].name == "y"
    assert model.opset_imports["com.microsoft"] == 1
    # Artifacts run with onnxruntime's default optimizations (which rewrite
    # FusedConv into its NCHWc kernels): the attributes must hold there too.
    assert_same_with_optimizations(text, model)


def assert_same_with_optimizations(text, model):
    import numpy as np
    import onnxruntime as ort

    original = snapshot(model_from_text(text))
    feeds = random_feeds(original)
    want = run_ort(original, feeds)
    session = ort.InferenceSession(snapshot(model).SerializeToString(), providers=["CPUExecutionProvider"])
    for w, g in zip(want, session.run(None, feeds)):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


def test_conv_without_bias_and_1d():
    text = model_text(
        "float[1,3,8] x",
        "float[1,4,6] y",
        [const("W", [4, 3, 3])],
        "c = Conv(x, W)\n        y = Relu(c)",
    )
    model, _ = fuse(text, PASS)
    assert op_types(model) == ["FusedConv"]


def test_residual_add_goes_into_z():
    text = conv_act("a = Add(z, c)\n        y = Relu(a)", x="float[1,3,8,8] x, float[1,4,8,8] z")
    model, _ = fuse(text, PASS)
    (node,) = model.graph
    assert node.op_type == "FusedConv" and len(node.inputs) == 4
    assert_same_with_optimizations(text, model)


def test_old_clip_attributes():
    text = conv_act("y = Clip <min=0.0, max=6.0> (c)").replace('"" : 17', '"" : 9').replace("ir_version: 8", "ir_version: 4")
    model, _ = fuse(text, PASS)
    assert op_types(model) == ["FusedConv"]


# ---------------------------------------------------------------- refusals


def test_off_without_contrib():
    assert refused(conv_act("y = Relu(c)"), "fuse-conv-activation") == [
        "contrib ops are off (contrib=false): FusedConv is a com.microsoft op"
    ]


def test_float16_is_kept():
    text = model_text(
        "float16[1,3,8,8] x, float16[4,3,3,3] W",
        "float16[1,4,6,6] y",
        [],
        "c = Conv(x, W)\n        y = Relu(c)",
    )
    assert refused(text, PASS) == ["FusedConv runs float32 only; the Conv is FLOAT16"]


def test_conv_output_with_another_user_is_kept():
    text = conv_act("y = Relu(c)\n        z = Tanh(c)", out="float[1,4,8,8] y, float[1,4,8,8] z")
    assert refused(text, PASS) == ["Conv output has another user", "Conv output has another user"]


def test_non_constant_clip_bound_is_kept():
    text = conv_act("y = Clip(c, lo)", x="float[1,3,8,8] x, float lo")
    assert refused(text, PASS) == ["Clip min is not constant"]


def test_broadcast_residual_is_kept():
    text = conv_act("a = Add(c, z)\n        y = Relu(a)", x="float[1,3,8,8] x, float[1,4,1,1] z")
    assert refused(text, PASS) == ["the added value does not have the Conv output's shape"]


def test_two_input_sum_residual_goes_into_z():
    text = conv_act("a = Sum(c, z)\n        y = Relu(a)", x="float[1,3,8,8] x, float[1,4,8,8] z")
    model, _ = fuse(text, PASS)
    assert op_types(model) == ["FusedConv"]


def test_residual_computed_from_the_conv_is_kept():
    text = conv_act("r = Tanh(c)\n        a = Add(c, r)\n        y = Relu(a)")
    report, _ = rule_report(text, PASS)
    assert not report.modified
    assert [(r.rule, r.reason) for r in report.refused] == [
        ("conv-activation", "Conv output has another user"),  # at the Tanh
        ("conv-add-activation", "Conv output has another user"),  # at the Relu
    ]
