"""simplify-layout: Transpose / Reshape / Flatten / Squeeze / Unsqueeze chains."""

from __future__ import annotations

import pytest

from tests.helpers import op_types
from tests.passes.fusion import const, fuse, model_text, refused

PASS = "simplify-layout"


def test_inverse_transposes_cancel():
    text = model_text(
        "float[2,3,4] x",
        "float[2,3,4] y",
        [],
        "r = Relu(x)\n        t = Transpose <perm=[2,0,1]> (r)\n        u = Transpose <perm=[1,2,0]> (t)\n        y = Tanh(u)",
    )
    model, report = fuse(text, PASS)
    assert report.modified
    assert op_types(model) == ["Relu", "Tanh"]


def test_transposes_compose():
    text = model_text(
        "float[2,3,4,5] x",
        "float[4,2,5,3] y",
        [],
        "t = Transpose <perm=[0,2,3,1]> (x)\n        y = Transpose <perm=[1,0,2,3]> (t)",
    )
    model, _ = fuse(text, PASS)
    assert op_types(model) == ["Transpose"]
    assert list(model.graph[0].attributes["perm"].as_ints()) == [2, 0, 3, 1]


def test_default_perms_cancel_into_a_graph_output():
    text = model_text(
        "float[2,3] x",
        "float[2,3] y",
        [],
        "r = Relu(x)\n        t = Transpose(r)\n        y = Transpose(t)",
    )
    model, _ = fuse(text, PASS)
    assert op_types(model) == ["Relu"]
    assert model.graph.outputs[0].name == "y"


def test_transpose_pair_from_input_to_output_is_kept():
    text = model_text("float[2,3] x", "float[2,3] y", [], "t = Transpose(x)\n        y = Transpose(t)")
    assert refused(text, PASS) == ["a graph output would become a graph input or initializer"]


def test_transpose_with_another_user_is_kept():
    text = model_text(
        "float[2,3] x", "float[2,3] y, float[3,2] z", [], "z = Transpose(x)\n        y = Transpose(z)"
    )
    assert refused(text, PASS) == ["first Transpose output is a graph output"]


@pytest.mark.parametrize("first", ["Reshape(x, s1)", "Flatten <axis=2> (x)", "Unsqueeze(x, ax)"])
def test_reshape_after_reshape_like_reads_the_source(first):
    text = model_text(
        "float[2,3,4] x",
        "float[6,4] y",
        [const("s1", [2], dtype="int64", values=[4, 6]), const("s2", [2], dtype="int64", values=[6, -1]),
         const("ax", [1], dtype="int64", values=[0])],
        f"a = {first}\n        y = Reshape(a, s2)",
    )
    model, _ = fuse(text, PASS)
    assert op_types(model) == ["Reshape"]
    assert model.graph[0].inputs[0].name == "x"


def test_reshape_copy_dim_is_resolved_from_the_known_shape():
    text = model_text(
        "float[2,3,4] x",
        "float[3,8] y",
        [const("s1", [2], dtype="int64", values=[3, 8]), const("s2", [2], dtype="int64", values=[0, -1])],
        "a = Reshape(x, s1)\n        y = Reshape(a, s2)",
    )
    model, _ = fuse(text, PASS)
    assert op_types(model) == ["Reshape"]


def test_reshape_copy_dim_of_unknown_size_is_kept():
    text = model_text(
        "float[N,12] x, int64[2] s1",
        "float[?,?] y",
        [const("s2", [2], dtype="int64", values=[0, -1])],
        "a = Reshape(x, s1)\n        y = Reshape(a, s2)",
    )
    assert refused(text, PASS) == [
        "the target shape copies a dim (0) of the intermediate value, whose size is unknown"
    ]


def test_flatten_after_reshape_becomes_one_reshape():
    text = model_text(
        "float[2,3,4] x",
        "float[6,4] y",
        [const("s1", [3], dtype="int64", values=[3, 2, 4])],
        "a = Reshape(x, s1)\n        y = Flatten <axis=2> (a)",
    )
    model, _ = fuse(text, PASS)
    assert op_types(model) == ["Reshape"]


@pytest.mark.parametrize(
    "body",
    [
        "a = Unsqueeze(x, ax)\n        y = Squeeze(a, ax)",
        "a = Unsqueeze(x, ax)\n        y = Squeeze(a, neg)",
        "a = Squeeze(x, one)\n        y = Unsqueeze(a, one)",
    ],
)
def test_squeeze_unsqueeze_pairs_cancel(body):
    text = model_text(
        "float[2,1,4] x",
        "float[2,1,4] y",
        [const("ax", [2], dtype="int64", values=[0, 3]), const("neg", [2], dtype="int64", values=[-5, -2]),
         const("one", [1], dtype="int64", values=[1])],
        f"r = Relu(x)\n        {body.replace('(x', '(r')}\n        ",
    ).replace("y = ", "z = ").replace("    }", "    y = Tanh(z)\n    }")
    model, _ = fuse(text, PASS)
    assert op_types(model) == ["Relu", "Tanh"]


def test_squeeze_unsqueeze_old_opset_attributes():
    text = model_text(
        "float[2,4] x",
        "float[2,4] y",
        [],
        "r = Relu(x)\n        a = Unsqueeze <axes=[1]> (r)\n        z = Squeeze <axes=[1]> (a)\n        y = Tanh(z)",
        header='<ir_version: 7, opset_import: ["" : 11]>',
    )
    model, _ = fuse(text, PASS)
    assert op_types(model) == ["Relu", "Tanh"]


def test_different_axes_are_kept():
    # Two Unsqueezes merge into one (unsqueeze-chain); the Squeeze/Unsqueeze pair below does not cancel.
    text = model_text(
        "float[2,4] x",
        "float[1,2,1,4] y",
        [const("a0", [1], dtype="int64", values=[0]), const("a2", [1], dtype="int64", values=[2])],
        "a = Unsqueeze(x, a0)\n        y = Unsqueeze(a, a2)\n",
    )
    _, report = fuse(text, PASS)
    assert report.modified
    text = model_text(
        "float[1,4] x",
        "float[1,4] y",
        [const("a1", [1], dtype="int64", values=[1]), const("a0", [1], dtype="int64", values=[0])],
        "a = Unsqueeze(x, a1)\n        y = Squeeze(a, a0)",
    )
    assert refused(text, PASS) == ["the Squeeze and Unsqueeze axes differ"]


def test_unsqueeze_chain_merges_axes():
    import numpy as np

    from tests.helpers import op_types, optimize

    model, report = optimize(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[5] x) => (float[1,5,1,1] y) {
          a0 = Constant<value = int64[1] {0}>()
          a1 = Constant<value = int64[1] {2}>()
          a2 = Constant<value = int64[1] {3}>()
          u0 = Unsqueeze(x, a0)
          u1 = Unsqueeze(u0, a1)
          y = Unsqueeze(u1, a2)
        }""",
        "simplify-layout,eliminate-dead",
    )
    assert report.modified
    assert op_types(model) == ["Unsqueeze"]
    axes = model.graph.node(0).inputs[1]
    np.testing.assert_array_equal((axes.const_value or axes.producer().attributes["value"].as_tensor()).numpy(), [0, 2, 3])


def test_unsqueeze_chain_outer_axis_before_inner_axes():
    from tests.helpers import optimize

    model, report = optimize(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[1,2,1,3] y) {
          a = Constant<value = int64[1] {1}>()
          b = Constant<value = int64[1] {0}>()
          u = Unsqueeze(x, a)
          y = Unsqueeze(u, b)
        }""",
        "simplify-layout,eliminate-dead",
    )
    assert report.modified  # optimize() also compares outputs with onnxruntime


def test_unsqueeze_chain_keeps_a_shared_middle_value():
    from tests.helpers import model_from_text

    from passes.fusion.layout import SimplifyLayout

    model = model_from_text(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[5] x) => (float[1,1,5] y, float[1,5] u) {
          a = Constant<value = int64[1] {0}>()
          u = Unsqueeze(x, a)
          y = Unsqueeze(u, a)
        }"""
    )
    report = SimplifyLayout().run(model)
    assert not report.modified
    assert any("graph output" in r or "another user" in r for r in report.reasons("unsqueeze-chain"))
