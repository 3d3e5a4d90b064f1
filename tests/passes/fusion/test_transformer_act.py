"""fuse-gelu and fuse-silu: fire on the exporter forms, keep numerics, refuse with a reason."""

from __future__ import annotations

import pytest

import passes.fusion  # noqa: F401  (registers the fusion passes)
from compiler.ir.verifier import verify_model
from passes.fusion.transformer_act import FuseGelu, FuseSilu
from tests.helpers import assert_same_outputs, assert_unique_names, model_from_text, op_types, snapshot

RTOL, ATOL = 1e-3, 1e-4


def fuse(text: str, p):
    model = model_from_text(text)
    before = snapshot(model)
    report = p.run(model)
    verify_model(model)
    assert_unique_names(model)
    return model, before, report


def gelu_erf(opset: int, order: str = "torch", div: bool = True) -> str:
    scaled = "t = Div(x, sqrt2)" if div else "t = Mul(inv_sqrt2, x)"
    product = {
        # torch's legacy exporter: mul(mul(x, add(erf(div(x, sqrt2)), 1)), 0.5)
        "torch": "p = Mul(x, a)\n          y = Mul(p, half)",
        # HF's hand-written gelu: x * 0.5 * (1.0 + erf(...))
        "hf": "p = Mul(x, half)\n          y = Mul(p, a)",
        "inner": "p = Mul(half, a)\n          y = Mul(x, p)",
    }[order]
    return f"""<ir_version: 8, opset_import: ["" : {opset}]>
        g (float[2,16] x) => (float[2,16] y) <float sqrt2 = {{1.4142135}}, float inv_sqrt2 = {{0.70710678}}, float one = {{1.0}}, float half = {{0.5}}> {{
          {scaled}
          e = Erf(t)
          a = Add(e, one)
          {product}
        }}"""


GELU_TANH = """<ir_version: 8, opset_import: ["" : {opset}]>
    g (float[2,16] x) => (float[2,16] y) <float three = {{3.0}}, float k = {{0.044715}}, float c = {{0.7978845608}}, float one = {{1.0}}, float half = {{0.5}}> {{
      p3 = Pow(x, three)
      m = Mul(k, p3)
      i = Add(x, m)
      u = Mul(c, i)
      t = Tanh(u)
      a = Add(one, t)
      h = Mul(half, x)
      y = Mul(h, a)
    }}"""


@pytest.mark.parametrize("order", ["torch", "hf", "inner"])
@pytest.mark.parametrize("div", [True, False])
def test_erf_gelu_contrib(order, div):
    model, before, report = fuse(gelu_erf(17, order, div), FuseGelu(contrib=True))
    assert op_types(model) == ["Gelu"]
    assert model.graph[0].domain == "com.microsoft"
    assert_same_outputs(before, model, rtol=RTOL, atol=ATOL)


def test_erf_gelu_standard_at_opset_20():
    model, before, report = fuse(gelu_erf(20), FuseGelu())
    assert op_types(model) == ["Gelu"]
    node = model.graph[0]
    assert node.domain == "" and node.attributes["approximate"].as_string() == "none"
    assert_same_outputs(before, model, rtol=RTOL, atol=ATOL)


def test_gelu_below_opset_20_without_contrib_refuses():
    model, _, report = fuse(gelu_erf(17), FuseGelu())
    assert not report.modified
    assert report.reasons("gelu") == [
        "Gelu needs opset 20 (the model imports opset 17); "
        "onnxruntime's com.microsoft Gelu/FastGelu need contrib=true"
    ]


def test_tanh_gelu_standard_and_contrib():
    model, before, _ = fuse(GELU_TANH.format(opset=20), FuseGelu())
    assert op_types(model) == ["Gelu"]
    assert model.graph[0].attributes["approximate"].as_string() == "tanh"
    assert_same_outputs(before, model, rtol=RTOL, atol=ATOL)
    model, before, _ = fuse(GELU_TANH.format(opset=17), FuseGelu(contrib=True))
    assert op_types(model) == ["FastGelu"]
    assert_same_outputs(before, model, rtol=RTOL, atol=ATOL)


def test_tanh_gelu_with_multiplied_cube():
    text = GELU_TANH.format(opset=20).replace(
        "p3 = Pow(x, three)", "sq = Mul(x, x)\n      p3 = Mul(sq, x)"
    )
    model, before, _ = fuse(text, FuseGelu())
    assert op_types(model) == ["Gelu"]
    assert_same_outputs(before, model, rtol=RTOL, atol=ATOL)


def test_gelu_keeps_an_intermediate_with_another_user():
    text = gelu_erf(20).replace("=> (float[2,16] y)", "=> (float[2,16] y, float[2,16] e)")
    model, _, report = fuse(text, FuseGelu())
    assert not report.modified
    assert report.reasons("gelu") == ["intermediate value 'e' is a graph output"]


def test_gelu_wrong_constant_is_no_match():
    model, _, report = fuse(gelu_erf(20).replace("half = {0.5}", "half = {0.25}"), FuseGelu())
    assert not report.modified and report.refused == []


SILU = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[2,16] x) => (float[2,16] y) <float alpha = {{1.702}}> {{
      {body}
    }}"""


def test_silu_becomes_quick_gelu_with_contrib():
    model, before, _ = fuse(SILU.format(body="s = Sigmoid(x)\n      y = Mul(x, s)"), FuseSilu(contrib=True))
    assert op_types(model) == ["QuickGelu"]
    assert model.graph[0].attributes["alpha"].as_float() == 1.0
    assert_same_outputs(before, model, rtol=RTOL, atol=ATOL)


def test_quick_gelu_alpha():
    body = "a = Mul(x, alpha)\n      s = Sigmoid(a)\n      y = Mul(s, x)"
    model, before, _ = fuse(SILU.format(body=body), FuseSilu(contrib=True))
    assert op_types(model) == ["QuickGelu"]
    assert model.graph[0].attributes["alpha"].as_float() == pytest.approx(1.702)
    assert_same_outputs(before, model, rtol=RTOL, atol=ATOL)


def test_silu_standard_only_is_kept_with_the_measured_reason():
    model, _, report = fuse(SILU.format(body="s = Sigmoid(x)\n      y = Mul(x, s)"), FuseSilu())
    assert op_types(model) == ["Sigmoid", "Mul"]
    assert report.reasons("silu") == [
        "no standard op runs x*sigmoid(a*x) faster than Mul(Sigmoid) in onnxruntime "
        "(QuickGelu is a contrib op: needs contrib=true)"
    ]
