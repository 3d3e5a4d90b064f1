from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import op_types, optimize, run_passes

PASS = "cse"
HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def test_duplicate_chains_merge_in_one_run():
    model, report = optimize(
        f"""{HEADER}
        g (float[2,3] x) => (float[2,3] y) {{
          a1 = Relu(x)
          b1 = Neg(a1)
          a2 = Relu(x)
          b2 = Neg(a2)
          y = Add(b1, b2)
        }}""",
        PASS,
    )
    assert report.modified
    assert op_types(model) == ["Relu", "Neg", "Add"]
    add = model.graph[2]
    assert add.inputs[0] is add.inputs[1]


def test_equal_constants_and_attributes_merge():
    model, report = optimize(
        f"""{HEADER}
        g (float[2,3] x) => (float[3,2] y) {{
          c1 = Constant<value = float[3] {{1.0, 2.0, 3.0}}>()
          c2 = Constant<value = float[3] {{1.0, 2.0, 3.0}}>()
          a = Add(x, c1)
          b = Add(x, c2)
          t1 = Transpose<perm = [1, 0]>(a)
          t2 = Transpose<perm = [1, 0]>(b)
          y = Mul(t1, t2)
        }}""",
        PASS,
    )
    assert report.modified
    assert op_types(model) == ["Constant", "Add", "Transpose", "Mul"]


@pytest.mark.parametrize(
    "first,second",
    [
        ("Transpose<perm = [1, 0]>(x)", "Transpose<perm = [0, 1]>(x)"),
        ("LeakyRelu<alpha = 0.0>(x)", "LeakyRelu<alpha = -0.0>(x)"),
        ("Relu(x)", "Neg(x)"),
        ("Add(x, x)", "Add(x, z)"),
        ("Constant<value = float[2,3] {1,2,3,4,5,6}>()", "Constant<value = float[2,3] {1,2,3,4,5,7}>()"),
        ("Constant<value = float[2,3] {1,2,3,4,5,6}>()", "Constant<value = float[3,2] {1,2,3,4,5,6}>()"),
    ],
)
def test_different_nodes_stay(first, second):
    _, report = optimize(
        f"""{HEADER}
        g (float[2,3] x, float[2,3] z) => (float[?,?] y) {{
          a = {first}
          b = {second}
          y = Add(a, b)
        }}""",
        PASS,
        compare=False,
    )
    assert not report.modified


def test_random_ops_and_custom_ops_stay():
    _, report = optimize(
        """<ir_version: 8, opset_import: ["" : 17, "custom" : 1]>
        g (float[2,3] x) => (float[2,3] y) {
          r1 = RandomUniformLike(x)
          r2 = RandomUniformLike(x)
          c1 = custom.Op(x)
          c2 = custom.Op(x)
          s = Add(r1, r2)
          t = Add(c1, c2)
          y = Add(s, t)
        }""",
        PASS,
        compare=False,
    )
    assert not report.modified


def test_nodes_with_subgraphs_stay():
    _, report = optimize(
        f"""{HEADER}
        g (float[2] x, bool c) => (float[2] y) {{
          a = If (c) <then_branch = t1 () => (float[2] o1) {{ o1 = Neg(x) }}, else_branch = e1 () => (float[2] o2) {{ o2 = Relu(x) }}>
          b = If (c) <then_branch = t2 () => (float[2] o3) {{ o3 = Neg(x) }}, else_branch = e2 () => (float[2] o4) {{ o4 = Relu(x) }}>
          y = Add(a, b)
        }}""",
        PASS,
        feeds={"x": np.array([1.0, -1.0], np.float32), "c": np.array(False)},
    )
    assert not report.modified


def test_duplicate_graph_outputs_stay():
    model, report = optimize(
        f"""{HEADER}
        g (float[2] x) => (float[2] y, float[2] z) {{
          y = Relu(x)
          z = Relu(x)
        }}""",
        PASS,
    )
    assert not report.modified


def test_merges_inside_subgraphs_using_outer_values():
    model, report = optimize(
        f"""{HEADER}
        g (float[2] x, bool c) => (float[2] y) {{
          y = If (c) <
            then_branch = t () => (float[2] o) {{ a = Neg(x) b = Neg(x) o = Mul(a, b) }},
            else_branch = e () => (float[2] o2) {{ o2 = Relu(x) }}
          >
        }}""",
        PASS,
        feeds={"x": np.array([1.0, -3.0], np.float32), "c": np.array(True)},
    )
    assert report.modified
    then_branch = next(g for g in model.graph.subgraphs() if g.name == "t")
    assert [n.op_type for n in then_branch] == ["Neg", "Mul"]


def test_small_duplicate_initializers_merge_but_not_large_or_overridable_ones():
    big = ", ".join(["1.0"] * 1100)
    model, report = optimize(
        f"""{HEADER}
        g (float[2] x, float[2] o) => (float[2] y, float[1100] z)
          <float[2] a = {{1.0, 2.0}}, float[2] b = {{1.0, 2.0}}, float[2] o = {{1.0, 2.0}},
           float[1100] big1 = {{{big}}}, float[1100] big2 = {{{big}}}> {{
          s = Add(x, a)
          t = Add(x, b)
          u = Add(s, t)
          y = Add(u, o)
          z = Add(big1, big2)
        }}""",
        PASS,
    )
    assert report.modified
    assert sorted(model.graph.initializers) == ["a", "big1", "big2", "o"]
    assert op_types(model) == ["Add", "Add", "Add", "Add"]

    model, report = optimize(
        f"""{HEADER}
        g (float[2] x) => (float[2] y) <float[2] a = {{1.0, 2.0}}, float[2] b = {{1.0, 2.0}}> {{
          s = Add(x, a)
          y = Add(s, b)
        }}""",
        "cse{initializers=false}",
    )
    assert not report.modified


def test_second_run_changes_nothing():
    model, report = optimize(
        f"""{HEADER}
        g (float[2,3] x) => (float[2,3] y) <float[3] a = {{1.0, 2.0, 3.0}}, float[3] b = {{1.0, 2.0, 3.0}}> {{
          p = Mul(x, a)
          q = Mul(x, b)
          r = Sigmoid(p)
          s = Sigmoid(q)
          y = Sub(r, s)
        }}""",
        PASS,
    )
    assert report.modified
    assert op_types(model) == ["Mul", "Sigmoid", "Sub"]
    assert not run_passes(model, PASS).modified
