"""Gather/Slice of Shape (fold-shapes), simplify-reshape-shape and infer-types."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from tests.helpers import model_from_text, op_types, optimize, run_passes

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def test_gather_of_a_static_dim_folds_while_other_dims_are_dynamic():
    model, report = optimize(
        f"""{HEADER}
        g (float[N,384] x) => (float[N,2,192] y) {{
          s = Shape(x)
          i = Constant<value = int64 {{1}}>()
          d = Gather<axis = 0>(s, i)
          two = Constant<value = int64 {{2}}>()
          h = Div(d, two)
          k = Constant<value = int64[1] {{0}}>()
          hu = Unsqueeze(h, k)
          lead = Constant<value = int64[2] {{0, 2}}>()
          t = Concat<axis = 0>(lead, hu)
          y = Reshape(x, t)
        }}""",
        "fold-shapes,fold-constants,eliminate-dead",
    )
    assert report.modified
    assert op_types(model) == ["Reshape"]


def test_slice_of_shape_folds_only_when_the_picked_dims_are_static():
    model, report = optimize(
        f"""{HEADER}
        g (float[N,3,4] x) => (int64[2] a2, int64[1] b2) {{
          s = Shape(x)
          st = Constant<value = int64[1] {{1}}>()
          en = Constant<value = int64[1] {{3}}>()
          a = Slice(s, st, en)
          a2 = Add(a, a)
          z = Constant<value = int64[1] {{0}}>()
          o = Constant<value = int64[1] {{1}}>()
          b = Slice(s, z, o)
          b2 = Add(b, b)
        }}""",
        "fold-shapes,fold-constants,eliminate-dead",
    )
    assert report.modified
    # a = [3, 4] folded (a2 stays: graph outputs are not folded); the slice of the dynamic dim N stays.
    assert sorted(op_types(model)) == ["Add", "Add", "Shape", "Slice"]
    np.testing.assert_array_equal(model.graph.initializers["a"].const_value.numpy(), [3, 4])


def test_reshape_target_from_own_shape_becomes_constant_with_zeros():
    model, report = optimize(
        f"""{HEADER}
        g (float[B,S,64] x) => (float[B,S,4,16] y) {{
          s = Shape(x)
          i0 = Constant<value = int64 {{0}}>()
          i1 = Constant<value = int64 {{1}}>()
          b = Gather<axis = 0>(s, i0)
          q = Gather<axis = 0>(s, i1)
          ax = Constant<value = int64[1] {{0}}>()
          bu = Unsqueeze(b, ax)
          qu = Unsqueeze(q, ax)
          tail = Constant<value = int64[2] {{4, 16}}>()
          t = Concat<axis = 0>(bu, qu, tail)
          y = Reshape(x, t)
        }}""",
        "simplify-reshape-shape,fold-constants,eliminate-dead",
    )
    assert report.modified
    assert op_types(model) == ["Reshape"]
    target = model.graph.node(0).inputs[1].const_value.numpy()
    np.testing.assert_array_equal(target, [0, 0, 4, 16])


def test_reshape_target_of_another_value_with_the_same_named_dims():
    model, report = optimize(
        f"""{HEADER}
        g (float[B,S,64] x, float[64,64] w) => (float[B,S,4,16] y) {{
          s = Shape(x)
          i0 = Constant<value = int64 {{0}}>()
          b = Gather<axis = 0>(s, i0)
          ax = Constant<value = int64[1] {{0}}>()
          bu = Unsqueeze(b, ax)
          tail = Constant<value = int64[3] {{-1, 4, 16}}>()
          t = Concat<axis = 0>(bu, tail)
          p = MatMul(x, w)
          y = Reshape(p, t)
        }}""",
        "simplify-reshape-shape,fold-constants,eliminate-dead",
    )
    assert report.modified
    assert op_types(model) == ["MatMul", "Reshape"]


def test_reshape_target_not_rewritten_when_dims_differ_or_target_is_shared():
    text = f"""{HEADER}
        g (float[B,S,64] x) => (float[S,B,64] y, int64[3] t) {{
          s = Shape(x)
          i0 = Constant<value = int64 {{0}}>()
          i1 = Constant<value = int64 {{1}}>()
          b = Gather<axis = 0>(s, i0)
          q = Gather<axis = 0>(s, i1)
          ax = Constant<value = int64[1] {{0}}>()
          bu = Unsqueeze(b, ax)
          qu = Unsqueeze(q, ax)
          tail = Constant<value = int64[1] {{64}}>()
          t = Concat<axis = 0>(qu, bu, tail)
          y = Reshape(x, t)
        }}"""
    model = model_from_text(text)
    report = run_passes(model, "simplify-reshape-shape")
    assert not report.modified  # positions swapped (and the target is a graph output)


def test_infer_types_types_values_and_enables_cast_removal():
    text = f"""{HEADER}
        g (float[B,8] x) => (float[B,8] y) {{
          a = Relu(x)
          c = Cast<to = 1>(a)
          y = Neg(c)
        }}"""
    model = model_from_text(text)
    assert model.graph.node(0).outputs[0].type is None
    report = run_passes(model, "infer-types,eliminate-identity")
    assert [r.modified for r in report.records] == [True, True]
    assert op_types(model) == ["Relu", "Neg"]
    relu_out = model.graph.node(0).outputs[0]
    assert relu_out.dtype == ir.DataType.FLOAT and relu_out.shape is None  # dtype only
    again = run_passes(model, "infer-types")
    assert not again.modified


def test_reshape_of_a_1d_value_to_minus_one_goes():
    model, report = optimize(
        f"""{HEADER}
        g (float[N] x) => (float[N] y) {{
          r = Relu(x)
          m = Constant<value = int64[1] {{-1}}>()
          f = Reshape(r, m)
          y = Neg(f)
        }}""",
        "simplify-reshape-shape,eliminate-dead",
    )
    assert report.modified
    assert op_types(model) == ["Relu", "Neg"]


def test_reshape_of_a_2d_value_to_minus_one_stays():
    model = model_from_text(
        f"""{HEADER}
        g (float[N,3] x) => (float[M] y) {{
          r = Relu(x)
          m = Constant<value = int64[1] {{-1}}>()
          f = Reshape(r, m)
          y = Neg(f)
        }}"""
    )
    assert not run_passes(model, "simplify-reshape-shape").modified


def test_equal_of_dynamic_sizes_and_minus_one_folds():
    model, report = optimize(
        f"""{HEADER}
        g (float[B,S] x, float[B,S,4] z) => (float[B,S,4] y) {{
          s = Shape(x)
          i0 = Constant<value = int64 {{0}}>()
          i1 = Constant<value = int64 {{1}}>()
          b = Gather<axis = 0>(s, i0)
          q = Gather<axis = 0>(s, i1)
          ax = Constant<value = int64[1] {{0}}>()
          bu = Unsqueeze(b, ax)
          qu = Unsqueeze(q, ax)
          four = Constant<value = int64[1] {{4}}>()
          t = Concat<axis = 0>(bu, qu, four)
          neg = Constant<value = int64[3] {{-1, -1, 4}}>()
          e = Equal(t, neg)
          ones = Constant<value = int64[3] {{1, 1, 1}}>()
          w = Where(e, ones, t)
          y = Expand(z, w)
        }}""",
        "fold-shapes",
    )
    assert report.modified
    assert "Equal" not in op_types(model)
    np.testing.assert_array_equal(model.graph.initializers["e"].const_value.numpy(), [False, False, True])


def test_equal_with_a_non_negative_constant_stays():
    model = model_from_text(
        f"""{HEADER}
        g (float[B,S] x) => (bool[1] e) {{
          s = Shape(x)
          i0 = Constant<value = int64 {{0}}>()
          b = Gather<axis = 0>(s, i0)
          ax = Constant<value = int64[1] {{0}}>()
          bu = Unsqueeze(b, ax)
          two = Constant<value = int64[1] {{2}}>()
          e0 = Equal(bu, two)
          e = Identity(e0)
        }}"""
    )
    assert not run_passes(model, "fold-shapes").modified
