from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from tests.helpers import model_from_text, op_types, optimize, run_passes

PASS = "eliminate-identity"
HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def test_identity_chain_disappears():
    model, report = optimize(
        f"""{HEADER}
        g (float[2,3] x) => (float[2,3] y) {{
          a = Identity(x)
          b = Identity(a)
          y = Relu(b)
        }}""",
        PASS,
    )
    assert report.modified
    assert op_types(model) == ["Relu"]
    assert model.graph[0].inputs[0] is model.graph.inputs[0]


def test_graph_output_keeps_its_name_and_type():
    model, report = optimize(
        f"""{HEADER}
        g (float[2,3] x) => (float[2,3] y) {{
          a = Relu(x)
          y = Identity(a)
        }}""",
        PASS,
    )
    assert report.modified
    assert op_types(model) == ["Relu"]
    (output,) = model.graph.outputs
    assert output.name == "y" and output.producer().op_type == "Relu"
    assert output.dtype == ir.DataType.FLOAT and list(output.shape) == [2, 3]


def test_identity_from_graph_input_to_graph_output_stays():
    _, report = optimize(
        f"""{HEADER}
        g (float[2,3] x) => (float[2,3] y) {{
          y = Identity(x)
        }}""",
        PASS,
    )
    assert not report.modified


def test_two_graph_outputs_of_one_value_stay_distinct():
    model, report = optimize(
        f"""{HEADER}
        g (float[2,3] x) => (float[2,3] y, float[2,3] z) {{
          a = Relu(x)
          y = Identity(a)
          z = Identity(a)
        }}""",
        PASS,
    )
    assert report.modified
    assert op_types(model) == ["Relu", "Identity"]
    assert [v.name for v in model.graph.outputs] == ["y", "z"]
    assert model.graph.outputs[0] is not model.graph.outputs[1]


def test_identity_of_initializer_to_graph_output_stays():
    _, report = optimize(
        f"""{HEADER}
        g (float[2] x) => (float[2] y) <float[2] w = {{1.0, 2.0}}> {{
          y = Identity(w)
        }}""",
        PASS,
    )
    assert not report.modified


NO_OPS = {
    "dropout (inference)": ("d = Dropout(x)", 13),
    "dropout with constant false training": (
        "f = Constant<value = bool {0}>()\n r = Constant<value = float {0.5}>()\n d = Dropout(x, r, f)",
        13,
    ),
    "dropout opset 10 with unused mask": ("d, m = Dropout(x)", 10),
    "cast to same dtype": ("d = Cast<to = 1>(x)", 17),
    "castlike same dtype": ("d = CastLike(x, x)", 17),
    "reshape to same shape": ("s = Constant<value = int64[2] {2, 3}>()\n d = Reshape(x, s)", 17),
    "reshape with 0 and -1": ("s = Constant<value = int64[2] {0, -1}>()\n d = Reshape(x, s)", 17),
    "expand by ones": ("s = Constant<value = int64[2] {1, 1}>()\n d = Expand(x, s)", 17),
    "expand by same dims": ("s = Constant<value = int64[1] {3}>()\n d = Expand(x, s)", 17),
    "squeeze without ones": ("d = Squeeze(x)", 17),
    "flatten rank 2": ("d = Flatten<axis = 1>(x)", 17),
    "transpose identity": ("d = Transpose<perm = [0, 1]>(x)", 17),
    "pad by zeros": ("p = Constant<value = int64[4] {0, 0, 0, 0}>()\n d = Pad(x, p)", 17),
    "slice everything": (
        "s = Constant<value = int64[2] {0, 0}>()\n"
        " e = Constant<value = int64[2] {2, 9223372036854775807}>()\n"
        " d = Slice(x, s, e)",
        17,
    ),
    "slice from negative start": (
        "s = Constant<value = int64[1] {-3}>()\n e = Constant<value = int64[1] {3}>()\n"
        " a = Constant<value = int64[1] {1}>()\n d = Slice(x, s, e, a)",
        17,
    ),
    "mul by one": ("o = Constant<value = float[3] {1.0, 1.0, 1.0}>()\n d = Mul(o, x)", 17),
    "add zero": ("z = Constant<value = float {0.0}>()\n d = Add(x, z)", 17),
    "sub zero": ("z = Constant<value = float[1,1] {0.0}>()\n d = Sub(x, z)", 17),
    "div by one": ("o = Constant<value = float {1.0}>()\n d = Div(x, o)", 17),
}


@pytest.mark.parametrize("body,opset", NO_OPS.values(), ids=NO_OPS.keys())
def test_no_op_is_removed(body, opset):
    model, report = optimize(
        f"""<ir_version: 8, opset_import: ["" : {opset}]>
        g (float[2,3] x) => (float[2,3] y) {{
          {body}
          y = Relu(d)
        }}""",
        PASS,
    )
    assert report.modified
    relu = next(n for n in model.graph if n.op_type == "Relu")
    assert relu.inputs[0] is model.graph.inputs[0]


REAL_OPS = {
    "dropout in training": (
        "f = Constant<value = bool {1}>()\n r = Constant<value = float {0.5}>()\n d = Dropout(x, r, f)"
    ),
    "dropout with used mask": "d, m = Dropout(x)\n u = Cast<to = 1>(m)\n w = Add(d, u)",
    "cast to other dtype": "c = Cast<to = 10>(x)\n d = Cast<to = 1>(c)",
    "reshape to other shape": "s = Constant<value = int64[2] {3, 2}>()\n r = Reshape(x, s)\n d = Reshape(r, s)",
    "expand that broadcasts": "s = Constant<value = int64[3] {2, 1, 1}>()\n d = Expand(x, s)",
    "transpose swap": "t = Transpose<perm = [1, 0]>(x)\n d = Transpose<perm = [1, 0]>(t)",
    "pad by one": "p = Constant<value = int64[4] {0, 1, 0, 0}>()\n d = Pad(x, p)",
    "slice a part": (
        "s = Constant<value = int64[1] {1}>()\n e = Constant<value = int64[1] {3}>()\n"
        " a = Constant<value = int64[1] {1}>()\n d = Slice(x, s, e, a)"
    ),
    "mul by ones that broadcast up": "o = Constant<value = float[2,2,3] {1,1,1,1,1,1,1,1,1,1,1,1}>()\n d = Mul(x, o)",
    "mul by two": "o = Constant<value = float {2.0}>()\n d = Mul(x, o)",
    "sub from zero": "z = Constant<value = float {0.0}>()\n d = Sub(z, x)",
}


@pytest.mark.parametrize("body", REAL_OPS.values(), ids=REAL_OPS.keys())
def test_op_that_does_something_stays(body):
    model, report = optimize(
        f"""{HEADER}
        g (float[2,3] x) => (int64[?] y) {{
          {body}
          y = Shape(d)
        }}""",
        PASS,
    )
    assert not report.modified


def test_reshape_of_unknown_shape_stays():
    _, report = optimize(
        f"""{HEADER}
        g (float[N,3] x) => (float[N,3] y) {{
          s = Constant<value = int64[2] {{2, 3}}>()
          y = Reshape(x, s)
        }}""",
        PASS,
        compare=False,
    )
    assert not report.modified


def test_old_dropout_in_training_mode_stays():
    _, report = optimize(
        """<ir_version: 3, opset_import: ["" : 6]>
        g (float[2,3] x) => (float[2,3] y) {
          d = Dropout<is_test = 0>(x)
          y = Relu(d)
        }""",
        PASS,
        compare=False,
    )
    assert not report.modified


def test_inside_if_branches_and_functions():
    model, report = optimize(
        """<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
        g (float[2] x, bool c) => (float[2] y, float[2] z) {
          a = Relu(x)
          y = If (c) <
            then_branch = g1 () => (float[2] o1) { t = Identity(a) o1 = Neg(t) },
            else_branch = g2 () => (float[2] o2) { o2 = Identity(a) }
          >
          z = local.f(a)
        }
        <domain: "local", opset_import: ["" : 17]>
        f (p) => (q) { r = Identity(p) s = Relu(r) q = Identity(s) }""",
        PASS,
        feeds={"x": np.array([1.0, -2.0], np.float32), "c": np.array(True)},
    )
    assert report.modified
    branches = {g.name: [n.op_type for n in g] for g in model.graph.subgraphs()}
    assert branches == {"g1": ["Neg"], "g2": ["Identity"]}  # o2 = Identity(outer a) must stay
    (function,) = model.functions.values()
    assert [n.op_type for n in function] == ["Relu"]
    assert [v.name for v in function.outputs] == ["q"]


def test_second_run_changes_nothing():
    text = f"""{HEADER}
        g (float[2,3] x) => (float[2,3] y, float[2,3] z) {{
          a = Identity(x)
          b = Relu(a)
          c = Identity(b)
          y = Identity(c)
          z = Identity(c)
        }}"""
    model, report = optimize(text, PASS)
    assert report.modified
    assert not run_passes(model, PASS).modified


def test_mul_by_scalar_one_goes_even_when_shapes_are_unknown():
    model = model_from_text(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[2,3] y) {
          r = Relu(x)
          one = Constant<value = float {1.0}>()
          m = Mul(r, one)
          y = Neg(m)
        }"""
    )
    assert model.graph.node(0).outputs[0].shape is None
    report = run_passes(model, "eliminate-identity,eliminate-dead")
    assert report.modified
    assert op_types(model) == ["Relu", "Neg"]
