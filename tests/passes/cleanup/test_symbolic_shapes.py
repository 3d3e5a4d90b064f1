"""onnxruntime's symbolic shape inference as a source of shapes for the cleanup passes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from passes.cleanup._shape_inference import infer_missing_shapes, restore
from passes.cleanup._symbolic import _clamped_to_symbol, _is_clamp_of
from tests.helpers import model_from_text, op_types, optimize

HEADER = '<ir_version: 8, opset_import: ["" : 17, "custom.domain" : 1]>'
HIDDEN = 96  # the bias below is 384 bytes... and the projection weight 96*96*4 bytes: stubbed during inference

#: BERT's embeddings: positions are buffer[:, :seq], Min(16, S) long, added to [B, S, H].
BERT = f"""{HEADER}
    g (int64[B,S] ids, float[{HIDDEN},{HIDDEN}] w) => (float[B,S,4,24] y) {{
      table = Constant<value = float[32,{HIDDEN}] {{{", ".join(["0.5"] * 32 * HIDDEN)}}}>()
      emb = Gather<axis = 0>(table, ids)
      s = Shape(ids)
      i1 = Constant<value = int64 {{1}}>()
      n = Gather<axis = 0>(s, i1)
      ax = Constant<value = int64[1] {{0}}>()
      nu = Unsqueeze(n, ax)
      buffer = Constant<value = int64[1,16] {{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}}>()
      zero = Constant<value = int64[1] {{0}}>()
      one = Constant<value = int64[1] {{1}}>()
      pos = Slice(buffer, zero, nu, one, one)
      ptable = Constant<value = float[16,{HIDDEN}] {{{", ".join(["0.25"] * 16 * HIDDEN)}}}>()
      pe = Gather<axis = 0>(ptable, pos)
      x = Add(emb, pe)
      p = MatMul(x, w)
      sx = Shape(x)
      i0 = Constant<value = int64 {{0}}>()
      b = Gather<axis = 0>(sx, i0)
      q = Gather<axis = 0>(sx, i1)
      bu = Unsqueeze(b, ax)
      qu = Unsqueeze(q, ax)
      tail = Constant<value = int64[2] {{4, 24}}>()
      t = Concat<axis = 0>(bu, qu, tail)
      y = Reshape(p, t)
    }}"""


def _value(model: ir.Model, name: str) -> ir.Value:
    return next(out for node in model.graph for out in node.outputs if out.name == name)


def test_min_of_a_constant_and_a_dim_broadcasts_as_that_dim():
    assert _is_clamp_of("Min(512, sequence)", "sequence")
    assert _is_clamp_of("Min(sequence,512)", "sequence")
    assert not _is_clamp_of("Min(1, sequence)", "sequence")  # Min(1, s) is 1 for every s
    assert not _is_clamp_of("Min(512, batch)", "sequence")
    assert not _is_clamp_of("Max(512, sequence)", "sequence")
    assert _clamped_to_symbol([1, "Min(16, S)", 8], ["B", "S", 8]) == ([1, "S", 8], ["B", "S", 8])
    assert _clamped_to_symbol(["T", 8], ["S", 8]) == (["T", 8], ["S", 8])


def test_symbolic_inference_names_the_sequence_dim_of_bert_embeddings():
    model = model_from_text(BERT)
    undo: list = []
    infer_missing_shapes(model, undo)
    onnx_only = _value(model, "x").shape
    restore(undo)
    assert onnx_only is None or not isinstance(onnx_only[1], ir.SymbolicDim) or onnx_only[1].value != "S"
    undo = []
    infer_missing_shapes(model, undo, symbolic=True)
    shape = _value(model, "x").shape
    assert [getattr(d, "value", d) for d in shape] == ["B", "S", HIDDEN]
    restore(undo)
    assert _value(model, "x").shape is None  # annotations go back


def test_bert_reshape_target_folds_and_matches_onnxruntime():
    rng = np.random.default_rng(0)
    feeds = {"ids": rng.integers(0, 32, size=(2, 5)).astype(np.int64),
             "w": rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32)}
    model, report = optimize(BERT, "simplify-reshape-shape,fold-constants,eliminate-dead", feeds=feeds)
    assert report.modified
    reshape = next(node for node in model.graph if node.op_type == "Reshape")
    np.testing.assert_array_equal(reshape.inputs[1].const_value.numpy(), [0, 0, 4, 24])
    assert "Shape" in op_types(model)  # the position Slice still needs the sequence length


def test_inference_stops_quietly_at_an_unknown_op_and_writes_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = model_from_text(
        f"""{HEADER}
        g (float[B,8] x) => (float[B,8] y) {{
          a = Relu(x)
          c = custom.domain.Mystery(a)
          y = Neg(c)
        }}"""
    )
    undo: list = []
    infer_missing_shapes(model, undo, symbolic=True)
    assert [getattr(d, "value", d) for d in _value(model, "a").shape] == ["B", 8]
    restore(undo)
    assert list(tmp_path.iterdir()) == []
