"""fuse-attention: the standard Attention (opset 23), com.microsoft MultiHeadAttention
(contrib + gpu), and the reasons it refuses."""

from __future__ import annotations

import pytest

import passes.fusion  # noqa: F401  (registers the fusion passes)
from compiler.ir.verifier import verify_model
from passes.fusion.transformer_attention import MHA_NOT_FASTER, FuseAttention
from tests.helpers import assert_same_outputs, assert_unique_names, model_from_text, op_types, snapshot

RTOL, ATOL = 1e-3, 1e-4


def fuse(text: str, p):
    model = model_from_text(text)
    before = snapshot(model)
    report = p.run(model)
    verify_model(model)
    assert_unique_names(model)
    return model, before, report


def bert_like(opset: int, mask: str = "float[2,1,1,5] mask", outputs: str = "float[2,5,16] y") -> str:
    """BERT's eager attention as exported: heads split by Reshape/Transpose, K transposed (0,2,3,1)."""
    return f"""<ir_version: 8, opset_import: ["" : {opset}]>
    g (float[2,5,16] q, float[2,5,16] k, float[2,5,16] v, {mask}) => ({outputs})
      <int64[4] split = {{0, 0, 2, 8}}, int64[3] merge = {{0, 0, -1}}, float scale = {{0.35355339}}> {{
      q4 = Reshape(q, split)
      qt = Transpose<perm = [0, 2, 1, 3]>(q4)
      k4 = Reshape(k, split)
      kt = Transpose<perm = [0, 2, 3, 1]>(k4)
      v4 = Reshape(v, split)
      vt = Transpose<perm = [0, 2, 1, 3]>(v4)
      s = MatMul(qt, kt)
      ss = Mul(s, scale)
      sm = Add(ss, mask)
      p = Softmax<axis = -1>(sm)
      o = MatMul(p, vt)
      ot = Transpose<perm = [0, 2, 1, 3]>(o)
      y = Reshape(ot, merge)
    }}"""


# LLaMA's eager attention: rotary-like elementwise ops on BNSH Q/K, K^T as (0,1,3,2),
# a causal (1,1,S,T) mask, Div by sqrt(H), two no-op Casts after the Softmax.
LLAMA_LIKE = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[2,5,16] q, float[2,5,16] k, float[2,5,16] v, float[1,1,5,8] rot, float[1,1,5,5] mask) => (float[2,5,16] y)
      <int64[4] split = {0, 0, -1, 8}, int64[3] merge = {0, 0, -1}, float root = {2.8284271}> {
      q4 = Reshape(q, split)
      qt = Transpose<perm = [0, 2, 1, 3]>(q4)
      qr = Mul(qt, rot)
      k4 = Reshape(k, split)
      kb = Transpose<perm = [0, 2, 1, 3]>(k4)
      kr = Mul(kb, rot)
      kt = Transpose<perm = [0, 1, 3, 2]>(kr)
      v4 = Reshape(v, split)
      vt = Transpose<perm = [0, 2, 1, 3]>(v4)
      s = MatMul(qr, kt)
      ss = Div(s, root)
      sm = Add(mask, ss)
      p = Softmax<axis = -1>(sm)
      c1 = Cast<to = 1>(p)
      c2 = Cast<to = 1>(c1)
      o = MatMul(c2, vt)
      ot = Transpose<perm = [0, 2, 1, 3]>(o)
      y = Reshape(ot, merge)
    }"""


def test_standard_attention_at_opset_23():
    model, before, report = fuse(bert_like(23), FuseAttention())
    assert report.fired_rules() == ["attention"]
    ops = op_types(model)
    assert "Attention" in ops and "Softmax" not in ops and ops.count("MatMul") == 0
    attention = next(n for n in model.graph if n.op_type == "Attention")
    assert attention.domain == "" and attention.attributes["scale"].as_float() == pytest.approx(8**-0.5)
    assert_same_outputs(before, model, rtol=RTOL, atol=ATOL)


def test_below_opset_23_standard_only_refuses():
    model, _, report = fuse(bert_like(17), FuseAttention())
    assert not report.modified
    assert report.reasons("attention") == [
        "Attention needs opset 23 (the model imports opset 17); "
        "onnxruntime's MultiHeadAttention needs contrib=true and gpu=true"
    ]


def test_contrib_on_the_cpu_keeps_the_measured_reason():
    model, _, report = fuse(bert_like(17), FuseAttention(contrib=True))
    assert not report.modified
    assert report.reasons("attention") == [MHA_NOT_FASTER]


def test_multi_head_attention_bert_like():
    model, before, report = fuse(bert_like(17), FuseAttention(contrib=True, gpu=True))
    assert report.fired_rules() == ["attention"]
    ops = op_types(model)
    assert "MultiHeadAttention" in ops
    assert not {"Softmax", "MatMul", "Transpose"} & set(ops)
    mha = next(n for n in model.graph if n.op_type == "MultiHeadAttention")
    assert mha.domain == "com.microsoft" and mha.attributes["num_heads"].as_int() == 2
    # The final Reshape reads the MultiHeadAttention output directly.
    assert model.graph.outputs[0].producer().inputs[0] is mha.outputs[0]
    assert_same_outputs(before, model, rtol=RTOL, atol=ATOL)


def test_multi_head_attention_llama_like():
    model, before, report = fuse(LLAMA_LIKE, FuseAttention(contrib=True, gpu=True))
    assert report.fired_rules() == ["attention"], report.refused
    ops = op_types(model)
    assert "MultiHeadAttention" in ops and "Softmax" not in ops and "Cast" not in ops
    mha = next(n for n in model.graph if n.op_type == "MultiHeadAttention")
    assert mha.attributes["num_heads"].as_int() == 2
    assert mha.attributes["scale"].as_float() == pytest.approx(8**-0.5)
    assert_same_outputs(before, model, rtol=RTOL, atol=ATOL)


def test_probabilities_used_elsewhere_are_kept():
    text = bert_like(23, outputs="float[2,5,16] y, float[2,2,5,5] p")
    model, _, report = fuse(text, FuseAttention())
    assert not report.modified
    assert report.reasons("attention") == ["intermediate value 'p' is a graph output"]


def test_standard_attention_refuses_a_per_head_mask():
    model, _, report = fuse(bert_like(23, mask="float[2,2,5,5] mask"), FuseAttention())
    assert not report.modified
    assert report.reasons("attention") == [
        "the mask may have a head dim (onnxruntime's Attention mishandles per-head masks)"
    ]


def test_multi_head_attention_takes_a_per_head_mask():
    model, before, _ = fuse(bert_like(23, mask="float[2,2,5,5] mask"), FuseAttention(contrib=True, gpu=True))
    assert "MultiHeadAttention" in op_types(model)
    assert_same_outputs(before, model, rtol=RTOL, atol=ATOL)


def test_non_constant_scale_is_no_attention():
    text = bert_like(23).replace(", float scale = {0.35355339}", "").replace(
        "float[2,1,1,5] mask)", "float[2,1,1,5] mask, float scale)"
    )
    model, _, report = fuse(text, FuseAttention())
    assert not report.modified and report.refused == []


def test_a_mask_of_known_query_and_key_length_is_not_expanded():
    model, before, _ = fuse(bert_like(23, mask="float[2,1,5,5] mask"), FuseAttention())
    ops = op_types(model)
    assert "Attention" in ops and "Expand" not in ops
    assert_same_outputs(before, model, rtol=RTOL, atol=ATOL)


def test_standard_attention_llama_like_at_opset_23():
    text = LLAMA_LIKE.replace('"" : 17', '"" : 23')
    model, before, report = fuse(text, FuseAttention())
    assert report.fired_rules() == ["attention"], report.refused
    assert "Attention" in op_types(model) and "Softmax" not in op_types(model)
    assert_same_outputs(before, model, rtol=RTOL, atol=ATOL)
