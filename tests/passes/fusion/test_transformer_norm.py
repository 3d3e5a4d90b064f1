"""fuse-layer-norm, fuse-rms-norm, fuse-skip-norm: fire, keep numerics, refuse with a reason."""

from __future__ import annotations

import pytest

import passes.fusion  # noqa: F401  (registers the fusion passes)
from compiler.ir.verifier import verify_model
from passes.fusion.transformer_norm import FuseLayerNorm, FuseRmsNorm, FuseSkipNorm
from tests.helpers import assert_same_outputs, assert_unique_names, model_from_text, op_types, snapshot

RTOL, ATOL = 1e-3, 1e-4


def fuse(text: str, *passes):
    """Run the passes' rules on the parsed model; (model, the original proto, last report)."""
    model = model_from_text(text)
    before = snapshot(model)
    report = None
    for p in passes:
        report = p.run(model)
        verify_model(model)
        assert_unique_names(model)
    return model, before, report


def header(opset: int) -> str:
    return f'<ir_version: 8, opset_import: ["" : {opset}]>'


def layer_norm_text(opset: int, *, mul_first: bool = False, reciprocal: bool = False, shared_mean: bool = False) -> str:
    axes = "<axes = [-1]>" if opset < 18 else ""
    axes_in = "" if opset < 18 else ", ax"
    scale = "y0 = Mul(g, n)" if mul_first else "y0 = Mul(n, g)"
    divide = "r = Reciprocal(s)\n          n = Mul(d, r)" if reciprocal else "n = Div(d, s)"
    extra = ", float[2,5,1] m" if shared_mean else ""
    return f"""{header(opset)}
        g (float[2,5,8] x{"" if not shared_mean else ""}) => (float[2,5,8] y{extra}) <float[8] g = {{1,2,3,4,5,6,7,8}}, float[8] b = {{0,1,0,1,0,1,0,1}}, float two = {{2.0}}, float eps = {{1e-5}}, int64[1] ax = {{-1}}> {{
          m = ReduceMean{axes}(x{axes_in})
          d = Sub(x, m)
          p = Pow(d, two)
          v = ReduceMean{axes}(p{axes_in})
          e = Add(v, eps)
          s = Sqrt(e)
          {divide}
          {scale}
          y = Add(y0, b)
        }}"""


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("variant", [{}, {"mul_first": True}, {"reciprocal": True}])
def test_layer_norm_fires_on_exporter_forms(opset, variant):
    model, before, report = fuse(layer_norm_text(opset, **variant), FuseLayerNorm())
    assert report.modified
    assert op_types(model) == ["LayerNormalization"]
    ln = model.graph[0]
    assert len(ln.inputs) == 3 and ln.attributes["axis"].as_int() == -1
    assert ln.attributes["epsilon"].as_float() == pytest.approx(1e-5)
    assert_same_outputs(before, model, rtol=RTOL, atol=ATOL)


def test_layer_norm_below_opset_17_needs_contrib():
    text = layer_norm_text(14)
    model, _, report = fuse(text, FuseLayerNorm())
    assert not report.modified
    assert report.reasons("layer-norm") == [
        "LayerNormalization needs opset 17 (the model imports opset 14); "
        "onnxruntime's own LayerNormalization needs contrib=true"
    ]
    model, before, report = fuse(text, FuseLayerNorm(contrib=True))
    assert op_types(model) == ["LayerNormalization"]
    assert_same_outputs(before, model, rtol=RTOL, atol=ATOL)


def test_layer_norm_keeps_a_shared_intermediate():
    model, before, report = fuse(layer_norm_text(17, shared_mean=True), FuseLayerNorm())
    assert not report.modified
    assert any("has another user" in r or "graph output" in r for r in report.reasons("layer-norm"))
    assert "LayerNormalization" not in op_types(model)


def test_layer_norm_refuses_non_trailing_axes():
    text = f"""{header(17)}
        g (float[2,5,8] x) => (float[2,5,8] y) <float two = {{2.0}}, float eps = {{1e-5}}> {{
          m = ReduceMean<axes = [1]>(x)
          d = Sub(x, m)
          p = Pow(d, two)
          v = ReduceMean<axes = [1]>(p)
          e = Add(v, eps)
          s = Sqrt(e)
          y = Div(d, s)
        }}"""
    model, _, report = fuse(text, FuseLayerNorm())
    assert not report.modified
    assert report.reasons("layer-norm") == [
        "ReduceMean axes [1] are not the trailing axes of an input of known rank"
    ]


def test_layer_norm_without_affine_gets_a_unit_scale():
    text = f"""{header(17)}
        g (float[2,5,8] x) => (float[2,5,8] y) <float two = {{2.0}}, float eps = {{1e-5}}> {{
          m = ReduceMean<axes = [-1]>(x)
          d = Sub(x, m)
          p = Mul(d, d)
          v = ReduceMean<axes = [-1]>(p)
          e = Add(eps, v)
          s = Sqrt(e)
          y = Div(d, s)
        }}"""
    model, before, report = fuse(text, FuseLayerNorm())
    assert op_types(model) == ["LayerNormalization"]
    assert_same_outputs(before, model, rtol=RTOL, atol=ATOL)


def test_layer_norm_bias_add_joins_an_existing_layer_norm():
    text = f"""{header(17)}
        g (float[2,5,8] x) => (float[2,5,8] y) <float[8] g = {{1,2,3,4,5,6,7,8}}, float[8] b = {{1,1,1,1,2,2,2,2}}> {{
          n = LayerNormalization<axis = -1>(x, g)
          y = Add(b, n)
        }}"""
    model, before, report = fuse(text, FuseLayerNorm())
    assert op_types(model) == ["LayerNormalization"]
    assert len(model.graph[0].inputs) == 3
    assert_same_outputs(before, model, rtol=RTOL, atol=ATOL)


def rms_text(opset: int, *, casts: bool = False, form: str = "div-one", weight: bool = True) -> str:
    t = "float16" if casts else "float"
    cast_in = "xc = Cast<to = 1>(x)" if casts else "xc = Identity(x)"
    inv = {
        "div-one": "r = Div(one, s)\n          n = Mul(xc, r)",
        "reciprocal": "r = Reciprocal(s)\n          n = Mul(r, xc)",
        "div": "n = Div(xc, s)",
    }[form]
    cast_out = "nc = Cast<to = 10>(n)" if casts else "nc = Identity(n)"
    tail = "y = Mul(w, nc)" if weight else "y = Identity(nc)"
    return f"""{header(opset)}
        g ({t}[2,5,8] x) => ({t}[2,5,8] y) <{t}[8] w = {{1,2,3,4,5,6,7,8}}, float two = {{2.0}}, float eps = {{1e-6}}, float one = {{1.0}}, int64[1] ax = {{-1}}> {{
          {cast_in}
          p = Pow(xc, two)
          v = ReduceMean{"<axes = [-1]>" if opset < 18 else ""}(p{"" if opset < 18 else ", ax"})
          e = Add(v, eps)
          s = Sqrt(e)
          {inv}
          {cast_out}
          {tail}
        }}"""


def _strip_identities(text: str) -> str:
    """The exporter form has no Identity: turn `a = Identity(b)` into a rename."""
    lines, renames = [], {}
    for line in text.splitlines():
        stripped = line.strip()
        if " = Identity(" in stripped:
            out, src = stripped.split(" = Identity(")
            renames[out] = renames.get(src[:-1], src[:-1])
            continue
        lines.append(line)
    import re

    result = "\n".join(lines)
    for out, src in renames.items():
        result = re.sub(rf"\b{out}\b(?! =)", src, result)
    return result


@pytest.mark.parametrize("form", ["div-one", "reciprocal", "div"])
def test_rms_norm_contrib_fires(form):
    model, before, report = fuse(_strip_identities(rms_text(17, form=form)), FuseRmsNorm(contrib=True))
    assert report.modified, report.refused
    assert op_types(model) == ["SimplifiedLayerNormalization"]
    assert_same_outputs(before, model, rtol=RTOL, atol=ATOL)


def test_rms_norm_standard_needs_opset_23():
    text = _strip_identities(rms_text(17))
    model, _, report = fuse(text, FuseRmsNorm())
    assert not report.modified
    assert report.reasons("rms-norm") == [
        "RMSNormalization needs opset 23 (the model imports opset 17); "
        "onnxruntime's SimplifiedLayerNormalization needs contrib=true"
    ]


def test_rms_norm_opset_23_uses_the_standard_op():
    model, before, report = fuse(_strip_identities(rms_text(23)), FuseRmsNorm())
    assert op_types(model) == ["RMSNormalization"]
    assert_same_outputs(before, model, rtol=RTOL, atol=ATOL)


def test_rms_norm_llama_casts_fuse():
    model, before, report = fuse(_strip_identities(rms_text(17, casts=True)), FuseRmsNorm(contrib=True))
    assert op_types(model) == ["SimplifiedLayerNormalization"]
    node = model.graph[0]
    assert node.inputs[0].name == "x"
    assert_same_outputs(before, model, rtol=1e-2, atol=1e-2)  # float16 output


def test_rms_norm_without_weight_gets_a_unit_weight():
    model, before, report = fuse(_strip_identities(rms_text(17, weight=False)), FuseRmsNorm(contrib=True))
    assert op_types(model) == ["SimplifiedLayerNormalization"]
    assert_same_outputs(before, model, rtol=RTOL, atol=ATOL)


def test_rms_norm_refuses_a_cast_to_double():
    text = _strip_identities(rms_text(17, casts=True)).replace("Cast<to = 1>(x)", "Cast<to = 11>(x)")
    text = text.replace("float two", "double two").replace("float eps", "double eps").replace("float one", "double one")
    model, _, report = fuse(text, FuseRmsNorm(contrib=True))
    assert not report.modified
    assert report.reasons("rms-norm") == ["the input is cast to DOUBLE, not float"]


SKIP = f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[2,5,8] a, float[2,5,8] b) => (float[2,5,8] y, float[2,5,8] z) <float[8] g = {{1,2,3,4,5,6,7,8}}, float[8] be = {{0,1,0,1,0,1,0,1}}> {{
      s = Add(a, b)
      y = LayerNormalization<axis = -1, epsilon = 1e-5>(s, g, be)
      z = Add(s, y)
    }}"""


def test_skip_layer_norm_with_residual_output():
    model, before, report = fuse(SKIP, FuseSkipNorm(contrib=True, gpu=True))
    assert op_types(model) == ["SkipLayerNormalization", "Add"]
    skip = model.graph[0]
    assert skip.domain == "com.microsoft"
    assert model.graph[1].inputs[0] is skip.outputs[3]
    assert_same_outputs(before, model, rtol=RTOL, atol=ATOL)


def test_skip_layer_norm_without_residual_user():
    text = SKIP.replace("z = Add(s, y)", "z = Neg(y)")
    model, before, report = fuse(text, FuseSkipNorm(contrib=True, gpu=True))
    assert op_types(model) == ["SkipLayerNormalization", "Neg"]
    assert len(model.graph[0].outputs) == 1
    assert_same_outputs(before, model, rtol=RTOL, atol=ATOL)


def test_skip_norm_needs_contrib():
    model, _, report = fuse(SKIP, FuseSkipNorm())
    assert not report.modified
    assert report.reasons("skip-norm") == [
        "Skip*Normalization is an onnxruntime contrib op (needs contrib=true)"
    ]


def test_skip_norm_is_kept_for_the_cpu_with_the_measured_reason():
    model, _, report = fuse(SKIP, FuseSkipNorm(contrib=True))
    assert not report.modified
    assert report.reasons("skip-norm") == [
        "onnxruntime's CPU Skip*Normalization measured slower than Add + the norm "
        "(set gpu=true for GPU execution providers)"
    ]


def test_skip_norm_refuses_broadcast_add():
    text = SKIP.replace("float[2,5,8] b", "float[8] b")
    model, _, report = fuse(text, FuseSkipNorm(contrib=True, gpu=True))
    assert not report.modified
    assert report.reasons("skip-norm") == [
        "the Add operands may broadcast ((2, 5, 8) and (8,))"
    ]


def test_skip_layer_norm_puts_the_broadcast_operand_second():
    text = SKIP.replace("float[2,5,8] a", "float[1,5,8] a").replace("z = Add(s, y)", "z = Neg(y)")
    model, before, report = fuse(text, FuseSkipNorm(contrib=True, gpu=True))
    skip = model.graph[0]
    assert skip.op_type == "SkipLayerNormalization"
    assert [v.name for v in skip.inputs[:2]] == ["b", "a"]
    assert_same_outputs(before, model, rtol=RTOL, atol=ATOL)


def test_skip_simplified_layer_norm_after_rms_fusion():
    text = _strip_identities(rms_text(17)).replace("g (float[2,5,8] x)", "g (float[2,5,8] a, float[2,5,8] c)")
    text = text.replace("p = Pow(x, two)", "x = Add(a, c)\n          p = Pow(x, two)")
    model, before, _ = fuse(text, FuseRmsNorm(contrib=True), FuseSkipNorm(contrib=True, gpu=True))
    assert op_types(model) == ["SkipSimplifiedLayerNormalization"]
    assert_same_outputs(before, model, rtol=RTOL, atol=ATOL)
