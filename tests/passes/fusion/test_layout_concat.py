"""simplify-concat-slice: Concat / Split / Slice simplifications."""

from __future__ import annotations

from tests.helpers import op_types
from tests.passes.fusion import const, fuse, model_text, refused

PASS = "simplify-concat-slice"


def ints(name: str, values: list[int]) -> str:
    return const(name, [len(values)], dtype="int64", values=values)


def test_single_input_concat_is_removed():
    text = model_text(
        "float[2,3] x", "float[2,3] y", [], "r = Relu(x)\n        c = Concat <axis=0> (r)\n        y = Tanh(c)"
    )
    model, report = fuse(text, PASS)
    assert report.modified
    assert op_types(model) == ["Relu", "Tanh"]


def test_single_input_concat_from_graph_input_to_output_is_kept():
    text = model_text("float[2,3] x", "float[2,3] y", [], "y = Concat <axis=0> (x)")
    assert refused(text, PASS) == ["a graph output would become a graph input or initializer"]


def test_nested_concats_flatten():
    text = model_text(
        "float[2,3] a, float[2,3] b, float[2,3] c",
        "float[2,15] y",
        [],
        """i = Concat <axis=1> (a, b)
        j = Concat <axis=-1> (c, a)
        y = Concat <axis=1> (i, j, b)""",
    )
    model, _ = fuse(text, PASS)
    assert op_types(model) == ["Concat"]
    assert [v.name for v in model.graph[0].inputs] == ["a", "b", "c", "a", "b"]


def test_nested_concat_on_another_axis_is_kept():
    text = model_text(
        "float[2,3] a, float[2,3] b", "float[4,6] y", [], "i = Concat <axis=0> (a, b)\n        y = Concat <axis=1> (i, i)"
    )
    assert refused(text, PASS) == ["the inner Concat joins another axis"]


def test_nested_concat_with_another_user_is_kept():
    text = model_text(
        "float[2,3] a, float[2,3] b",
        "float[2,9] y, float[2,6] i",
        [],
        "i = Concat <axis=1> (a, b)\n        y = Concat <axis=1> (i, a)",
    )
    assert refused(text, PASS) == ["inner Concat output is a graph output"]


def test_slice_selecting_one_concat_input_is_that_input():
    text = model_text(
        "float[2,3] a, float[2,4] b, float[2,5] c",
        "float[2,4] y, float[2,12] z",
        [ints("st", [3]), ints("en", [7]), ints("ax", [1])],
        """z = Concat <axis=1> (a, b, c)
        s = Slice(z, st, en, ax)
        y = Relu(s)""",
    )
    model, _ = fuse(text, PASS)
    assert op_types(model) == ["Concat", "Relu"]  # the Concat stays for its other user
    assert model.graph[1].inputs[0].name == "b"


def test_slice_to_the_end_with_negative_start_drops_the_concat():
    text = model_text(
        "float[2,3] a, float[2,5] c",
        "float[2,5] y",
        [ints("st", [-5]), ints("en", [2**62]), ints("ax", [-1])],
        """z = Concat <axis=1> (a, c)
        s = Slice(z, st, en, ax)
        y = Relu(s)""",
    )
    model, _ = fuse(text, PASS)
    assert op_types(model) == ["Relu"]


def test_slice_across_concat_inputs_is_kept():
    text = model_text(
        "float[2,3] a, float[2,4] b",
        "float[2,4] y",
        [ints("st", [1]), ints("en", [5]), ints("ax", [1])],
        "z = Concat <axis=1> (a, b)\n        y = Slice(z, st, en, ax)",
    )
    assert refused(text, PASS) == ["the Slice does not select exactly one Concat input"]


def test_slice_on_another_axis_is_kept():
    text = model_text(
        "float[2,3] a, float[2,4] b",
        "float[1,7] y",
        [ints("st", [0]), ints("en", [1]), ints("ax", [0])],
        "z = Concat <axis=1> (a, b)\n        y = Slice(z, st, en, ax)",
    )
    assert refused(text, PASS) == ["the Slice cuts another axis than the Concat joins"]


def test_split_then_concat_is_the_input():
    text = model_text(
        "float[2,6] x",
        "float[2,6] y",
        [],
        "r = Relu(x)\n        p, q, s = Split <axis=1, num_outputs=3> (r)\n        c = Concat <axis=-1> (p, q, s)\n        y = Tanh(c)",
        header='<ir_version: 8, opset_import: ["" : 18]>',
    )
    model, _ = fuse(text, PASS)
    assert op_types(model) == ["Relu", "Tanh"]


def test_split_run_inside_a_longer_concat_is_spliced():
    text = model_text(
        "float[2,6] x, float[2,1] e",
        "float[2,8] y, float[2,3] q",
        [ints("sizes", [3, 3])],
        "p, q = Split <axis=1> (x, sizes)\n        y = Concat <axis=1> (e, p, q, e)",
    )
    model, _ = fuse(text, PASS)
    # The Split stays: q is a graph output.
    assert op_types(model) == ["Split", "Concat"]
    assert [v.name for v in model.graph[1].inputs] == ["e", "x", "e"]


def test_split_outputs_out_of_order_are_kept():
    text = model_text(
        "float[2,6] x",
        "float[2,6] y",
        [ints("sizes", [3, 3])],
        "p, q = Split <axis=1> (x, sizes)\n        y = Concat <axis=1> (q, p)",
    )
    assert refused(text, PASS) == ["the Concat does not take every Split output in order"]
    text = text.replace("(q, p)", "(q, q)")
    assert refused(text, PASS) == ["no Split output run in the Concat"]


def test_split_on_another_axis_is_kept():
    text = model_text(
        "float[2,6] x",
        "float[1,12] y",
        [ints("sizes", [1, 1])],
        "p, q = Split <axis=0> (x, sizes)\n        y = Concat <axis=1> (p, q)",
    )
    assert refused(text, PASS) == ["the Split and the Concat use different axes"]


def _rotate_half(second_start: int = 8, second_end: int = 2**62, extra: str = "") -> str:
    """torch's rotate_half on [B, 2, S, 16]: cat(-x[..., 8:], x[..., :8])."""
    return model_text(
        "float[B,2,S,16] x",
        "float[B,2,S,16] y",
        [ints("zero", [0]), ints("half", [8]), ints("from", [second_start]), ints("to", [second_end]),
         ints("last", [-1]), ints("one", [1])],
        f"""a = Slice(x, zero, half, last, one)
        b = Slice(x, from, to, last, one)
        n = Neg(b)
        y = Concat <axis=-1> (n, a){extra}""",
    )


def test_slices_cutting_an_axis_in_two_become_a_split():
    import numpy as np

    rng = np.random.default_rng(0)
    model, report = fuse(_rotate_half(), PASS, feeds={"x": rng.standard_normal((2, 2, 5, 16)).astype(np.float32)})
    assert report.modified
    assert op_types(model) == ["Split", "Neg", "Concat"]
    split = model.graph.node(0)
    assert split.attributes.get_int("axis") == 3
    np.testing.assert_array_equal(split.inputs[1].const_value.numpy(), [8, 8])


def test_slices_with_a_gap_stay():
    assert "the Slices do not cut the axis into pieces without gaps or overlap" in refused(_rotate_half(9), PASS)


def test_slices_that_stop_short_of_the_end_stay():
    assert "the Slices do not cover the whole axis" in refused(_rotate_half(8, 15), PASS)


def test_slices_of_an_axis_of_unknown_size_stay():
    text = model_text(
        "float[B,N] x",
        "float[B,N] y",
        [ints("zero", [0]), ints("half", [8]), ints("to", [2**62]), ints("last", [-1]), ints("one", [1])],
        """a = Slice(x, zero, half, last, one)
        b = Slice(x, half, to, last, one)
        y = Concat <axis=-1> (b, a)""",
    )
    assert "the size of the sliced axis is unknown" in refused(text, PASS)
