"""MLC's quantization modes: the q4 encoding's layout, its error bound, and how kiln's schemes map to modes."""

from __future__ import annotations

import numpy as np
import pytest

from compiler.errors import UnsupportedError
from passes.quantize.schemes import parse_scheme
from targets.mlc import group_quant
from targets.mlc.modes import MODES, mode_of


def test_q4_layout_is_mlc_group_quantization():
    mode = MODES["q4f16_1"]
    w = np.zeros((1, 32), np.float32)
    w[0, :8] = [-7, -3, 0, 1, 2, 3, 6, 7]  # max |w| = 7 -> scale 1
    packed, scale = group_quant.encode(w, mode)
    assert packed.dtype == np.uint32 and packed.shape == (1, 4)
    assert scale.dtype == np.float16 and scale.shape == (1, 1) and scale[0, 0] == 1
    # code i of a word at bits 4i, stored as round(w / scale) + 7
    expected = sum((int(v) + 7) << (4 * i) for i, v in enumerate(w[0, :8]))
    assert int(packed[0, 0]) == expected
    assert all(int(word) == 0x77777777 for word in packed[0, 1:])  # zeros are code 7


@pytest.mark.parametrize("name", ["q4f16_1", "q4f32_1"])
def test_q4_roundtrip_error_within_half_a_step(name):
    mode = MODES[name]
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 100)).astype(np.float32)  # 100 columns: the last group is padded
    packed, scale = group_quant.encode(w, mode)
    assert packed.shape == (64, 16) and scale.shape == (64, 4) and scale.dtype == np.dtype(mode.model_dtype)
    back = group_quant.decode(packed, scale, 100, mode)
    step = np.repeat(scale.astype(np.float32), 32, axis=1)[:, :100]
    # half a step, plus the float16 rounding of the scale times the largest code (7)
    slack = 7 * step * (2.0 ** -11 if mode.model_dtype == "float16" else 1e-6)
    assert np.all(np.abs(back - w) <= step / 2 + slack + 1e-7)


def test_schemes_map_to_modes():
    assert mode_of(None).name == "q0f32"
    for name in MODES:
        assert mode_of(parse_scheme(name)).name == name
    assert mode_of(parse_scheme("w4{block-size=32}")).name == "q4f32_1"
    assert mode_of(parse_scheme("fp16")).name == "q0f16"
    with pytest.raises(UnsupportedError, match="no MLC encoding"):
        mode_of(parse_scheme("w4{block-size=64}"))
    with pytest.raises(UnsupportedError, match="no MLC encoding"):
        mode_of(parse_scheme("int8-dynamic"))


def test_graph_words_layout_is_the_llm_layout():
    """The TVM backend's ``words`` storage (graph packages) packs codes exactly as the LLM encoding does."""
    from targets.tvm.quant import pack_words, unpack_words

    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    packed, scale = group_quant.encode(w, MODES["q4f32_1"])
    codes = np.clip(np.round(w.reshape(8, 2, 32) / scale[..., None]), -7, 7).reshape(8, 64).astype(np.int16)
    np.testing.assert_array_equal(pack_words(codes), packed)
    np.testing.assert_array_equal(unpack_words(packed, 64), codes)
    # a partial last word is padded with zero codes (stored as 7)
    odd = pack_words(codes[:, :13])
    assert odd.shape == (8, 2) and np.all(odd[:, 1] >> 20 == 0x777)
    np.testing.assert_array_equal(unpack_words(odd, 13), codes[:, :13])
