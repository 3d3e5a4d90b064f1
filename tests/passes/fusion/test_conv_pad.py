"""fuse-pad: constant Pad folded into Conv / AveragePool / MaxPool pads."""

from __future__ import annotations

import pytest

from tests.helpers import op_types
from tests.passes.fusion import const, fuse, model_text, refused

PASS = "fuse-pad"
PADS = const("pads", [8], dtype="int64", values=[0, 0, 1, 2, 0, 0, 2, 1])


def padded(consumer: str, out: str, *, pads: str = PADS, pad_args: str = "x, pads", mode: str = "", extra: list[str] = ()) -> str:
    return model_text(
        "float[1,3,8,8] x",
        out,
        [const("W", [4, 3, 3, 3]), pads, *extra],
        f"p = Pad {mode} ({pad_args})\n        {consumer}",
    )


def test_pad_into_conv():
    text = padded("y = Conv <pads=[1,0,0,1]> (p, W)", "float[1,4,10,10] y")
    model, report = fuse(text, PASS)
    assert report.modified
    assert op_types(model) == ["Conv"]
    assert list(model.graph[0].attributes["pads"].as_ints()) == [2, 2, 2, 2]
    assert "pads" not in model.graph.initializers  # the Pad's constant went with it


def test_pad_into_conv_with_valid_auto_pad_and_zero_value():
    extra = [const("zero", [], values=[0.0])]
    text = padded('y = Conv <auto_pad="VALID"> (p, W)', "float[1,4,9,9] y", pad_args="x, pads, zero", extra=extra)
    model, _ = fuse(text, PASS)
    assert op_types(model) == ["Conv"] and "auto_pad" not in model.graph[0].attributes


def test_pad_with_axes_into_conv():
    text = model_text(
        "float[1,3,8,8] x",
        "float[1,4,8,8] y",
        [const("W", [4, 3, 3, 3]), const("pads", [4], dtype="int64", values=[1, 1, 1, 1]),
         const("zero", [], values=[0.0]), const("axes", [2], dtype="int64", values=[-2, -1])],
        "p = Pad(x, pads, zero, axes)\n        y = Conv(p, W)",
        header='<ir_version: 8, opset_import: ["" : 18]>',
    )
    model, _ = fuse(text, PASS)
    assert op_types(model) == ["Conv"]


def test_old_opset_pad_attributes():
    text = model_text(
        "float[1,3,8,8] x",
        "float[1,4,8,8] y",
        [const("W", [4, 3, 3, 3])],
        "p = Pad <pads=[0,0,1,1,0,0,1,1]> (x)\n        y = Conv(p, W)",
        header='<ir_version: 4, opset_import: ["" : 9]>',
    )
    model, _ = fuse(text, PASS)
    assert op_types(model) == ["Conv"]


@pytest.mark.parametrize("attrs", ["<kernel_shape=[3,3]>", "<kernel_shape=[4,4], strides=[2,2], count_include_pad=1, pads=[1,1,0,0]>"])
def test_pad_into_average_pool(attrs):
    text = padded(f"y = AveragePool {attrs} (p)", "float[1,3,?,?] y")
    model, _ = fuse(text, PASS)
    assert op_types(model) == ["AveragePool"]
    assert model.graph[0].attributes["count_include_pad"].as_int() == 1


@pytest.mark.parametrize("ceil", [0, 1])
def test_minus_inf_pad_into_max_pool(ceil):
    extra = [const("low", [], values=[float("-inf")])]
    text = padded(f"y = MaxPool <kernel_shape=[3,3], strides=[2,2], ceil_mode={ceil}> (p)", "float[1,3,?,?] y", pad_args="x, pads, low", extra=extra)
    model, _ = fuse(text, PASS)
    assert op_types(model) == ["MaxPool"]


def test_chained_pads_fold():
    text = model_text(
        "float[1,3,8,8] x",
        "float[1,4,10,10] y",
        [const("W", [4, 3, 3, 3]), PADS],
        "p = Pad(x, pads)\n        q = Pad(p, pads)\n        y = Conv(q, W)",
    ).replace("float[1,4,10,10] y", "float[1,4,12,12] y")
    model, _ = fuse(text, PASS)
    assert op_types(model) == ["Conv"]


# ---------------------------------------------------------------- refusals


def test_reflect_pad_is_kept():
    text = padded("y = Conv(p, W)", "float[1,4,9,9] y", mode='<mode="reflect">')
    assert refused(text, PASS) == ["Pad mode is reflect"]


def test_non_zero_value_is_kept():
    text = padded("y = Conv(p, W)", "float[1,4,9,9] y", pad_args="x, pads, v", extra=[const("v", [], values=[0.5])])
    assert refused(text, PASS) == ["Pad value is 0.5, not 0"]


def test_zero_pad_into_max_pool_is_kept():
    text = padded("y = MaxPool <kernel_shape=[3,3]> (p)", "float[1,3,9,9] y")
    assert refused(text, PASS) == ["Pad value is 0; MaxPool pads with -inf"]


def test_channel_pad_is_kept():
    pads = const("pads", [8], dtype="int64", values=[0, 1, 0, 0, 0, 0, 0, 0])
    text = padded("y = AveragePool <kernel_shape=[3,3]> (p)", "float[1,4,6,6] y", pads=pads)
    assert refused(text, PASS) == ["Pad pads the batch or channel dims"]


def test_negative_pad_is_kept():
    pads = const("pads", [8], dtype="int64", values=[0, 0, -1, 0, 0, 0, 0, 0])
    text = padded("y = Conv(p, W)", "float[1,4,5,6] y", pads=pads)
    assert refused(text, PASS) == ["Pad crops (negative pads)"]


def test_same_auto_pad_is_kept():
    text = padded('y = Conv <auto_pad="SAME_UPPER"> (p, W)', "float[1,4,11,11] y")
    assert refused(text, PASS) == ["Conv auto_pad is SAME_UPPER"]


def test_average_pool_excluding_its_own_pads_is_kept():
    text = padded("y = AveragePool <kernel_shape=[3,3], pads=[1,1,1,1]> (p)", "float[1,3,11,11] y")
    assert refused(text, PASS) == ["AveragePool has its own pads and count_include_pad=0"]


def test_pad_as_large_as_the_pool_kernel_is_kept():
    text = padded("y = AveragePool <kernel_shape=[2,2]> (p)", "float[1,3,10,10] y")
    assert refused(text, PASS) == ["the merged pads [1, 2, 2, 1] would not be smaller than the AveragePool kernel"]


def test_pad_with_another_user_is_kept():
    text = padded("y = Conv(p, W)\n        z = Relu(p)", "float[1,4,9,9] y, float[1,3,11,11] z")
    assert refused(text, PASS) == ["Pad output has another user"]


def test_non_constant_pads_are_kept():
    text = model_text(
        "float[1,3,8,8] x, int64[8] pads",
        "float[1,4,?,?] y",
        [const("W", [4, 3, 3, 3])],
        "p = Pad(x, pads)\n        y = Conv(p, W)",
    )
    assert refused(text, PASS) == ["Pad pads are not constant"]


def test_pad_into_fused_conv():
    text = padded("c = Conv(p, W)\n        y = Relu(c)", "float[1,4,9,9] y")
    model, _ = fuse(text, "fuse-conv-activation{contrib=true},fuse-pad")
    assert op_types(model) == ["FusedConv"]
    assert list(model.graph[0].attributes["pads"].as_ints()) == [1, 2, 2, 1]
