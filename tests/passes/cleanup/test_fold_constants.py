from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from compiler.ir.quant import QuantRecord, set_quant
from compiler.ir.verifier import verify_model
from tests.helpers import model_from_text, op_types, optimize, run_passes, snapshot

PASS = "fold-constants"
HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def _initializer(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def test_constant_expression_becomes_one_initializer():
    model, report = optimize(
        f"""{HEADER}
        g (float[2,3] x) => (float[2,3] y) {{
          a = Constant<value = float[3] {{1.0, 2.0, 3.0}}>()
          b = Constant<value = float[3] {{0.5, 0.5, 0.5}}>()
          c = Add(a, b)
          d = Sqrt(c)
          y = Mul(x, d)
        }}""",
        PASS,
    )
    assert report.modified
    assert op_types(model) == ["Mul"]
    np.testing.assert_allclose(_initializer(model, "d"), np.sqrt([1.5, 2.5, 3.5]), rtol=1e-6)
    folded = model.graph.initializers["d"]
    assert folded.dtype == ir.DataType.FLOAT and list(folded.shape) == [3]


def test_constant_nodes_become_initializers():
    model, report = optimize(
        f"""{HEADER}
        g (float[2] x) => (float[2] y) {{
          a = Constant<value_floats = [1.0, 2.0]>()
          y = Add(x, a)
        }}""",
        PASS,
    )
    assert report.modified
    assert op_types(model) == ["Add"]
    np.testing.assert_array_equal(_initializer(model, "a"), [1.0, 2.0])


def test_shape_chain_on_initializers_folds():
    model, report = optimize(
        f"""{HEADER}
        g (float[2,3,4] x) => (float[6,4] y) <int64[3] dims = {{2, 3, 4}}, int64[1] i = {{2}}> {{
          last = Gather<axis = 0>(dims, i)
          m = Constant<value = int64[1] {{-1}}>()
          target = Concat<axis = 0>(m, last)
          y = Reshape(x, target)
        }}""",
        PASS,
    )
    assert report.modified
    assert op_types(model) == ["Reshape"]
    np.testing.assert_array_equal(_initializer(model, "target"), [-1, 4])


def test_integer_division_truncates_like_onnx():
    model, report = optimize(
        f"""{HEADER}
        g (int64[4] x) => (int64[4] y) {{
          a = Constant<value = int64[4] {{-7, 7, -8, 9}}>()
          b = Constant<value = int64[4] {{2, -2, 3, 3}}>()
          q = Div(a, b)
          y = Add(x, q)
        }}""",
        PASS,
    )
    np.testing.assert_array_equal(_initializer(model, "q"), [-3, -3, -2, 3])


def test_multi_output_node_folds_through_the_reference_evaluator():
    model, report = optimize(
        f"""<ir_version: 8, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y) <float[4] w = {{1.0, 2.0, 3.0, 4.0}}> {{
          a, b = Split<num_outputs = 2>(w)
          c = Mul(a, b)
          d = Softmax(c)
          y = Add(x, d)
        }}""",
        PASS,
    )
    assert report.modified
    assert op_types(model) == ["Add"]


def test_small_constant_of_shape_folds():
    model, report = optimize(
        f"""{HEADER}
        g (float[4] x) => (float[4] y) <int64[1] n = {{4}}> {{
          c = ConstantOfShape<value = float[1] {{2.0}}>(n)
          y = Mul(x, c)
        }}""",
        PASS,
    )
    assert report.modified
    np.testing.assert_array_equal(_initializer(model, "c"), [2.0] * 4)


@pytest.mark.parametrize(
    "body",
    [
        # vgg19 in the onnx test data builds its weights like this (64 KiB)
        "c = ConstantOfShape<value = float[1] {0.01}>(n)",
        "c = Expand(one, n)",
        "c = Tile(one, n)",
    ],
)
def test_expansions_past_4k_stay(body):
    _, report = optimize(
        f"""{HEADER}
        g (float[128,128] x) => (float[128,128] y) <int64[2] n = {{128, 128}}, float[1,1] one = {{1.0}}> {{
          {body}
          y = Add(x, c)
        }}""",
        PASS,
    )
    assert not report.modified


def test_huge_constant_of_shape_is_not_even_evaluated():
    model = model_from_text(
        f"""{HEADER}
        g (float[1] x) => (float[1] y) <int64[3] n = {{100000, 100000, 100000}}, int64[1] one = {{1}}> {{
          c = ConstantOfShape<value = float[1] {{1.0}}>(n)
          s = Size(c)
          f = Cast<to = 1>(s)
          y = Mul(x, f)
        }}"""
    )
    assert not run_passes(model, PASS).modified


def test_size_limit_option():
    text = f"""{HEADER}
        g (float[8] x) => (float[8] y) <float[8] a = {{1,2,3,4,5,6,7,8}}, float[8] b = {{1,1,1,1,1,1,1,1}}> {{
          c = Add(a, b)
          y = Mul(x, c)
        }}"""
    _, report = optimize(text, "fold-constants{size-limit=16}")
    assert not report.modified
    _, report = optimize(text, "fold-constants{size-limit=32}")
    assert report.modified


@pytest.mark.parametrize(
    "body",
    [
        "r = RandomNormal<shape = [2], seed = 1.0>()\n c = Add(r, w)",
        "c = RandomUniformLike(w)",
        "c = Bernoulli(w)",
        "c = Dropout(w)",
    ],
)
def test_random_ops_stay(body):
    _, report = optimize(
        f"""{HEADER}
        g (float[2] x) => (float[2] y) <float[2] w = {{0.5, 0.5}}> {{
          {body}
          y = Mul(x, c)
        }}""",
        PASS,
        compare=False,
    )
    assert not report.modified


def test_graph_output_computed_from_constants_stays():
    _, report = optimize(
        f"""{HEADER}
        g (float[2] x) => (float[2] y, float[2] z) <float[2] a = {{1.0, 2.0}}> {{
          y = Neg(a)
          z = Relu(x)
        }}""",
        PASS,
    )
    assert not report.modified


def test_overridable_initializer_is_not_a_constant():
    text = f"""{HEADER}
        g (float[2] x, float[2] a) => (float[2] y) <float[2] a = {{1.0, 2.0}}> {{
          n = Neg(a)
          y = Add(x, n)
        }}"""
    _, report = optimize(text, PASS)
    assert not report.modified


def test_custom_domain_and_failing_nodes_are_left_alone():
    model = model_from_text(
        """<ir_version: 8, opset_import: ["" : 17, "custom" : 1]>
        g (float[2] x) => (float[2] y) <float[2] a = {1.0, 2.0}, int64[1] bad = {5}> {
          c = custom.Op(a)
          r = Reshape(a, bad)
          s = Add(c, x)
          y = Add(s, r)
        }"""
    )
    assert not run_passes(model, PASS).modified
    verify_model(model)


def test_weights_marked_for_quantization_are_not_folded():
    model = model_from_text(
        f"""{HEADER}
        g (float[2,2] x) => (float[2,2] y) <float[2,2] w = {{1.0, 2.0, 3.0, 4.0}}> {{
          t = Transpose<perm = [1, 0]>(w)
          y = MatMul(x, t)
        }}"""
    )
    set_quant(model.graph.initializers["w"], QuantRecord("int8", 8))
    assert not run_passes(model, PASS).modified


def test_ir_version_3_gets_constant_nodes_not_initializers():
    model, report = optimize(
        """<ir_version: 3, opset_import: ["" : 9]>
        g (float[2] x) => (float[2] y) {
          a = Constant<value = float[2] {1.0, 2.0}>()
          b = Neg(a)
          y = Add(x, b)
        }""",
        "fold-constants,eliminate-dead",
    )
    assert report.modified
    assert op_types(model) == ["Constant", "Add"]
    assert not model.graph.initializers
    onnx.checker.check_model(snapshot(model))
    assert not run_passes(model, PASS).modified


def test_folds_inside_subgraphs_and_functions():
    model, report = optimize(
        """<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
        g (float[2] x, bool c) => (float[2] y, float[2] z) <float[2] w = {1.0, 2.0}> {
          y = If (c) <
            then_branch = g1 () => (float[2] o1) { n = Neg(w) o1 = Add(x, n) },
            else_branch = g2 () => (float[2] o2) { o2 = Sub(x, w) }
          >
          z = local.f(x)
        }
        <domain: "local", opset_import: ["" : 17]>
        f (p) => (q) { k = Constant<value_float = 2.0>() h = Mul(k, k) q = Mul(p, h) }""",
        PASS,
        feeds={"x": np.array([1.0, -2.0], np.float32), "c": np.array(True)},
    )
    assert report.modified
    then_branch = next(g for g in model.graph.subgraphs() if g.name == "g1")
    assert [n.op_type for n in then_branch] == ["Add"]
    np.testing.assert_array_equal(then_branch.initializers["n"].const_value.numpy(), [-1.0, -2.0])
    (function,) = model.functions.values()
    assert [n.op_type for n in function] == ["Constant", "Constant", "Mul"]


def test_second_run_changes_nothing():
    model, report = optimize(
        f"""{HEADER}
        g (float[2,3] x) => (float[2,3] y) <int64[2] s = {{3, 2}}> {{
          a = Constant<value = float[6] {{1, 2, 3, 4, 5, 6}}>()
          r = Reshape(a, s)
          t = Transpose<perm = [1, 0]>(r)
          y = Add(x, t)
        }}""",
        PASS,
    )
    assert report.modified
    assert not run_passes(model, PASS).modified
