"""simplify-shape-math, and the Reshape-target rewrites it enables (-1, shared targets)."""

from __future__ import annotations

import numpy as np

from tests.helpers import model_from_text, op_types, optimize, run_passes

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
LOOP = "fixpoint(fold-shapes,simplify-shape-math,simplify-reshape-shape,fold-constants,cse,eliminate-dead)"

#: torch's k[:, :, None].expand(b, kv, rep, s, d).reshape(b, kv * rep, s, d) (LLaMA's GQA repeat_kv).
GQA = f"""{HEADER}
    g (float[B,2,S,16] k) => (float[B,4,S,16] y) {{
      s = Shape(k)
      i0 = Constant<value = int64 {{0}}>()
      i2 = Constant<value = int64 {{2}}>()
      b = Gather<axis = 0>(s, i0)
      q = Gather<axis = 0>(s, i2)
      ax = Constant<value = int64[1] {{0}}>()
      bu = Unsqueeze(b, ax)
      qu = Unsqueeze(q, ax)
      kv = Constant<value = int64[1] {{2}}>()
      rep = Constant<value = int64[1] {{2}}>()
      d = Constant<value = int64[1] {{16}}>()
      t = Concat<axis = 0>(bu, kv, rep, qu, d)
      m1 = Constant<value = int64 {{-1}}>()
      eq = Equal(t, m1)
      ones = Constant<value = int64[5] {{1, 1, 1, 1, 1}}>()
      w = Where(eq, ones, t)
      a2 = Constant<value = int64[1] {{2}}>()
      ku = Unsqueeze(k, a2)
      e = Expand(ku, w)
      heads = Constant<value = int64[1] {{4}}>()
      t2 = Concat<axis = 0>(bu, heads, qu, d)
      y = Reshape(e, t2)
    }}"""


def _feeds(**dims: tuple[int, ...]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in dims.items()}


def test_gqa_head_repeat_shape_math_folds_away():
    model, report = optimize(GQA, LOOP, feeds=_feeds(k=(2, 2, 5, 16)))
    assert report.modified
    assert op_types(model) == ["Unsqueeze", "Expand", "Reshape"]
    expand, reshape = model.graph.node(1), model.graph.node(2)
    # the picked sizes become 1 (broadcasting keeps the input's dim); constants stay
    np.testing.assert_array_equal(expand.inputs[1].const_value.numpy(), [1, 2, 2, 1, 16])
    # b copies dim 0; s sits at another position of the 5-D input, so it is the one -1
    np.testing.assert_array_equal(reshape.inputs[1].const_value.numpy(), [0, 4, -1, 16])


def test_gqa_rewrite_also_matches_onnxruntime_at_batch_and_sequence_one():
    optimize(GQA, LOOP, feeds=_feeds(k=(1, 2, 1, 16)))


def test_where_with_a_mixed_condition_stays():
    model = model_from_text(
        f"""{HEADER}
        g (int64[2] a, int64[2] b) => (int64[2] y) {{
          c = Constant<value = bool[2] {{1, 0}}>()
          w = Where(c, a, b)
          y = Neg(w)
        }}"""
    )
    assert not run_passes(model, "simplify-shape-math").modified


def test_where_whose_branch_would_be_broadcast_stays():
    # all-True picks a, but a is [1] and the output is [3] (b broadcasts it)
    model = model_from_text(
        f"""{HEADER}
        g (float[1] a, float[3] b) => (float[3] y) {{
          c = Constant<value = bool[3] {{1, 1, 1}}>()
          w = Where(c, a, b)
          y = Neg(w)
        }}"""
    )
    assert not run_passes(model, "simplify-shape-math").modified


def test_where_with_an_all_false_condition_is_its_second_branch():
    model, report = optimize(
        f"""{HEADER}
        g (float[B,4] a, float[B,4] b) => (float[B,4] y) {{
          c = Constant<value = bool[4] {{0, 0, 0, 0}}>()
          w = Where(c, a, b)
          y = Neg(w)
        }}""",
        "simplify-shape-math,eliminate-dead",
    )
    assert report.modified
    assert op_types(model) == ["Neg"]
    assert model.graph.node(0).inputs[0].name == "b"


def test_expand_to_its_own_shape_is_removed():
    model, report = optimize(
        f"""{HEADER}
        g (float[B,S] x) => (float[B,S] y) {{
          s = Shape(x)
          i0 = Constant<value = int64 {{0}}>()
          i1 = Constant<value = int64 {{1}}>()
          b = Gather<axis = 0>(s, i0)
          q = Gather<axis = 0>(s, i1)
          ax = Constant<value = int64[1] {{0}}>()
          bu = Unsqueeze(b, ax)
          qu = Unsqueeze(q, ax)
          t = Concat<axis = 0>(bu, qu)
          r = Relu(x)
          e = Expand(r, t)
          y = Neg(e)
        }}""",
        "simplify-shape-math,eliminate-dead",
        feeds=_feeds(x=(2, 5)),
    )
    assert report.modified
    assert op_types(model) == ["Relu", "Neg"]


def test_expand_to_another_values_dim_stays():
    # the target picks a dim of z, which may differ from x's (x's is 1 and broadcasts)
    model = model_from_text(
        f"""{HEADER}
        g (float[B,1] x, float[B,T] z) => (float[B,T] y) {{
          s = Shape(z)
          i1 = Constant<value = int64 {{1}}>()
          q = Gather<axis = 0>(s, i1)
          ax = Constant<value = int64[1] {{0}}>()
          qu = Unsqueeze(q, ax)
          one = Constant<value = int64[1] {{1}}>()
          t = Concat<axis = 0>(one, qu)
          y = Expand(x, t)
        }}"""
    )
    assert not run_passes(model, "simplify-shape-math").modified


def test_shared_reshape_target_is_rewritten_for_each_reshape():
    model, report = optimize(
        f"""{HEADER}
        g (float[B,S,64] x, float[64,64] wq, float[64,32] wk) => (float[B,S,4,16] q, float[B,S,2,16] k) {{
          s = Shape(x)
          i0 = Constant<value = int64 {{0}}>()
          i1 = Constant<value = int64 {{1}}>()
          b = Gather<axis = 0>(s, i0)
          n = Gather<axis = 0>(s, i1)
          ax = Constant<value = int64[1] {{0}}>()
          bu = Unsqueeze(b, ax)
          nu = Unsqueeze(n, ax)
          tail = Constant<value = int64[2] {{-1, 16}}>()
          t = Concat<axis = 0>(bu, nu, tail)
          pq = MatMul(x, wq)
          pk = MatMul(x, wk)
          q = Reshape(pq, t)
          k = Reshape(pk, t)
        }}""",
        "simplify-reshape-shape,fold-constants,cse,eliminate-dead",
    )
    assert report.modified
    assert sorted(op_types(model)) == ["MatMul", "MatMul", "Reshape", "Reshape"]
    for node in model.graph:
        if node.op_type == "Reshape":
            np.testing.assert_array_equal(node.inputs[1].const_value.numpy(), [0, 0, -1, 16])


def test_reshape_target_with_two_unprovable_sizes_stays():
    model = model_from_text(
        f"""{HEADER}
        g (float[B,S,64] x, float[T,U] z) => (float[T,U,64] y) {{
          s = Shape(z)
          i0 = Constant<value = int64 {{0}}>()
          i1 = Constant<value = int64 {{1}}>()
          a = Gather<axis = 0>(s, i0)
          c = Gather<axis = 0>(s, i1)
          ax = Constant<value = int64[1] {{0}}>()
          au = Unsqueeze(a, ax)
          cu = Unsqueeze(c, ax)
          d = Constant<value = int64[1] {{64}}>()
          t = Concat<axis = 0>(au, cu, d)
          y = Reshape(x, t)
        }}"""
    )
    assert not run_passes(model, "simplify-reshape-shape").modified


def test_one_unprovable_size_becomes_minus_one():
    model, report = optimize(
        f"""{HEADER}
        g (float[B,S,64] x, float[T] z) => (float[B,T,64] y) {{
          sx = Shape(x)
          sz = Shape(z)
          i0 = Constant<value = int64 {{0}}>()
          b = Gather<axis = 0>(sx, i0)
          t0 = Gather<axis = 0>(sz, i0)
          ax = Constant<value = int64[1] {{0}}>()
          bu = Unsqueeze(b, ax)
          tu = Unsqueeze(t0, ax)
          d = Constant<value = int64[1] {{64}}>()
          t = Concat<axis = 0>(bu, tu, d)
          y = Reshape(x, t)
        }}""",
        "simplify-reshape-shape,fold-constants,eliminate-dead",
        feeds=_feeds(x=(2, 5, 64), z=(5,)),
    )
    assert report.modified
    assert op_types(model) == ["Reshape"]
    np.testing.assert_array_equal(model.graph.node(0).inputs[1].const_value.numpy(), [0, -1, 64])


def test_minus_one_is_not_used_next_to_a_constant_zero():
    model = model_from_text(
        f"""{HEADER}
        g (float[B,S] x, float[T] z) => (float[B,S] y) {{
          sz = Shape(z)
          i0 = Constant<value = int64 {{0}}>()
          t0 = Gather<axis = 0>(sz, i0)
          ax = Constant<value = int64[1] {{0}}>()
          tu = Unsqueeze(t0, ax)
          zero = Constant<value = int64[1] {{0}}>()
          t = Concat<axis = 0>(zero, tu)
          y = Reshape(x, t)
        }}"""
    )
    assert not run_passes(model, "simplify-reshape-shape").modified
