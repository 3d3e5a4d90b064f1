from __future__ import annotations

import numpy as np

from tests.helpers import op_types, optimize, run_passes

PASS = "eliminate-dead"
HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def test_dead_chain_goes_in_one_run():
    model, report = optimize(
        f"""{HEADER}
        g (float[2] x) => (float[2] y) <float[2] w = {{1.0, 2.0}}> {{
          a = Add(x, w)
          b = Neg(a)
          c = Relu(b)
          y = Relu(x)
        }}""",
        PASS,
    )
    assert report.modified
    assert op_types(model) == ["Relu"]
    assert not model.graph.initializers
    assert not run_passes(model, PASS).modified


def test_clean_model_is_untouched_and_overridable_initializers_stay():
    _, report = optimize(
        f"""{HEADER}
        g (float[2] x, float[2] w) => (float[2] y, float[2] z) <float[2] w = {{1.0, 2.0}}> {{
          y = Relu(x)
          z = Neg(x)
        }}""",
        PASS,
    )
    assert not report.modified


def test_multi_output_node_with_one_used_output_stays():
    model, report = optimize(
        f"""{HEADER}
        g (float[4] x) => (float[2] y) <int64[2] s = {{2, 2}}> {{
          a, b = Split(x, s)
          y = Relu(b)
        }}""",
        PASS,
    )
    assert not report.modified
    assert op_types(model) == ["Split", "Relu"]


def test_values_used_only_in_subgraphs_stay_and_dead_subgraph_code_goes():
    model, report = optimize(
        f"""{HEADER}
        g (float[2] x, bool c) => (float[2] y) <float[2] w = {{1.0, 2.0}}> {{
          a = Neg(x)
          unused = Mul(a, w)
          y = If (c) <
            then_branch = t () => (float[2] o) {{ d = Sub(a, w) o = Relu(a) }},
            else_branch = e () => (float[2] o2) {{ o2 = Abs(a) }}
          >
        }}""",
        PASS,
        feeds={"x": np.array([1.0, -3.0], np.float32), "c": np.array(True)},
    )
    assert report.modified
    assert op_types(model) == ["Neg", "If"]
    then_branch = next(g for g in model.graph.subgraphs() if g.name == "t")
    assert [n.op_type for n in then_branch] == ["Relu"]
    assert not model.graph.initializers  # only the dead Sub and Mul read w


def test_removing_a_dead_if_frees_what_its_branches_read():
    model, report = optimize(
        f"""{HEADER}
        g (float[2] x, bool c) => (float[2] y) {{
          a = Neg(x)
          dead = If (c) <
            then_branch = t () => (float[2] o) {{ o = Relu(a) }},
            else_branch = e () => (float[2] o2) {{ o2 = Abs(a) }}
          >
          y = Relu(x)
        }}""",
        PASS,
        feeds={"x": np.array([1.0, -3.0], np.float32), "c": np.array(True)},
    )
    assert report.modified
    assert op_types(model) == ["Relu"]


def test_loop_body_is_swept_and_loop_kept():
    model, report = optimize(
        f"""{HEADER}
        g (float[2] x) => (float[2] y) <int64 n = {{3}}, bool t = {{1}}> {{
          y = Loop (n, t, x) <body = body (int64 i, bool cond, float[2] acc) => (bool cond_out, float[2] acc_out) {{
            cond_out = Identity(cond)
            junk = Neg(acc)
            acc_out = Add(acc, acc)
          }}>
        }}""",
        PASS,
    )
    assert report.modified
    (body,) = model.graph.subgraphs()
    assert [n.op_type for n in body] == ["Identity", "Add"]


def test_unused_functions_go_used_ones_stay():
    model, report = optimize(
        """<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
        g (float[2] x) => (float[2] y) {
          y = local.outer(x)
        }
        <domain: "local", opset_import: ["" : 17, "local" : 1]>
        outer (p) => (q) { d = Neg(p) q = local.inner(p) }
        <domain: "local", opset_import: ["" : 17]>
        inner (p) => (q) { q = Relu(p) }
        <domain: "local", opset_import: ["" : 17]>
        orphan (p) => (q) { q = Abs(p) }""",
        PASS,
    )
    assert report.modified
    assert sorted(f.name for f in model.functions.values()) == ["inner", "outer"]
    outer = next(f for f in model.functions.values() if f.name == "outer")
    assert [n.op_type for n in outer] == ["inner"]
