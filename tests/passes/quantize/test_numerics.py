"""The reference quantizer against an element-by-element reading of the ONNX spec, onnxruntime's
DequantizeLinear, and the half-a-step round-trip bound (hypothesis)."""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from passes.quantize import numerics

LAYOUTS = [  # (bits, block_size, axis, symmetric)
    (8, 0, 0, True), (8, 0, 1, True), (8, -1, 0, False), (8, 0, 1, False),
    (4, 32, 0, True), (4, 32, 0, False), (4, 16, 1, True), (4, 0, 1, True),
]


def _slow_reference(w, bits, block_size, axis, symmetric):
    """Scale/zero/codes computed group by group with plain Python loops."""
    groups: dict[tuple, list[tuple]] = {}
    for idx in itertools.product(*(range(n) for n in w.shape)):
        if block_size == -1:
            key = ()
        elif block_size == 0:
            key = (idx[axis],)
        else:
            key = tuple(i // block_size if d == axis else i for d, i in enumerate(idx))
        groups.setdefault(key, []).append(idx)
    q = np.zeros(w.shape, np.int64)
    deq = np.zeros(w.shape, np.float64)
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    for members in groups.values():
        vals = [float(w[i]) for i in members]
        lo, hi = min(min(vals), 0.0), max(max(vals), 0.0)
        if symmetric:
            scale = max(-lo, hi) / qmax
            zero = 0
        else:
            scale = (hi - lo) / (qmax - qmin)
        scale = np.float32(scale) if scale > 0 else np.float32(1.0)
        if not symmetric:
            zero = int(np.clip(np.round(qmin - lo / scale), qmin, qmax))
        for i in members:
            q[i] = int(np.clip(np.round(np.float32(w[i]) / scale) + zero, qmin, qmax))
            deq[i] = (q[i] - zero) * float(scale)
    return q, deq


@pytest.mark.parametrize("bits,block_size,axis,symmetric", LAYOUTS)
def test_matches_elementwise_reference(bits, block_size, axis, symmetric):
    rng = np.random.default_rng(bits * 100 + block_size + axis)
    w = (rng.standard_normal((40, 24)) * rng.uniform(0.1, 3, size=(1, 24))).astype(np.float32)
    q, scale, zero = numerics.quantize_weight(w, bits=bits, axis=axis, block_size=block_size, symmetric=symmetric)
    q_ref, deq_ref = _slow_reference(w, bits, block_size, axis, symmetric)
    np.testing.assert_array_equal(q.astype(np.int64), q_ref)
    deq = numerics.dequantize(q, scale, zero, axis=axis, block_size=block_size)
    np.testing.assert_allclose(deq, deq_ref, rtol=1e-6, atol=1e-7)


def _ort_dequantize(q, scale, zero, axis, block_size, bits, symmetric):
    storage = {(4, True): (ml_dtypes.int4, onnx.TensorProto.INT4), (4, False): (ml_dtypes.uint4, onnx.TensorProto.UINT4),
               (8, True): (np.int8, onnx.TensorProto.INT8), (8, False): (np.uint8, onnx.TensorProto.UINT8)}
    np_type, _ = storage[(bits, symmetric)]
    inits = [onnx.numpy_helper.from_array(q.astype(np_type), "q"), onnx.numpy_helper.from_array(scale, "s")]
    inputs = ["q", "s"]
    if zero is not None:
        inits.append(onnx.numpy_helper.from_array(zero.astype(np_type), "z"))
        inputs.append("z")
    attrs = {} if block_size == -1 else {"axis": axis}
    if block_size > 0:
        attrs["block_size"] = block_size
    node = oh.make_node("DequantizeLinear", inputs, ["y"], **attrs)
    graph = oh.make_graph([node], "g", [], [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]


@pytest.mark.parametrize("bits,block_size,axis,symmetric", LAYOUTS)
def test_onnxruntime_dequantizes_like_the_reference(bits, block_size, axis, symmetric):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    q, scale, zero = numerics.quantize_weight(w, bits=bits, axis=axis, block_size=block_size, symmetric=symmetric)
    ours = numerics.dequantize(q, scale, zero, axis=axis, block_size=block_size)
    theirs = _ort_dequantize(q, scale, zero, axis, block_size, bits, symmetric)
    np.testing.assert_allclose(theirs, ours, rtol=1e-6, atol=1e-7)


@settings(max_examples=150, deadline=None)
@given(
    w=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=70),
                 elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=False)),
    layout=st.sampled_from(LAYOUTS),
)
def test_round_trip_within_half_a_step(w, layout):
    bits, block_size, axis, symmetric = layout
    q, scale, zero = numerics.quantize_weight(w, bits=bits, axis=axis, block_size=block_size, symmetric=symmetric)
    lo, hi = numerics.qrange(bits, symmetric)
    assert q.min() >= lo and q.max() <= hi
    deq = numerics.dequantize(q, scale, zero, axis=axis, block_size=block_size)
    step = numerics._expand(scale, w.shape, axis, block_size)
    # half a step, plus float32 rounding of the scale arithmetic
    bound = step / 2 * (1 + 1e-5) + np.abs(w) * 1e-6
    assert np.all(np.abs(deq - w) <= bound)


def test_zero_is_exact_and_all_zero_blocks_survive():
    w = np.zeros((32, 4), np.float32)
    w[:, 1] = np.linspace(0.5, 2.0, 32)  # strictly positive channel: the affine range still holds 0
    for symmetric in (True, False):
        q, scale, zero = numerics.quantize_weight(w, bits=4, axis=0, block_size=32, symmetric=symmetric)
        deq = numerics.dequantize(q, scale, zero, axis=0, block_size=32)
        assert np.all(deq[:, 0] == 0) and np.all(np.isfinite(deq))


def test_metrics():
    a = np.array([1.0, 2.0, 3.0])
    assert numerics.cosine(a, 2 * a) == pytest.approx(1.0)
    assert numerics.cosine(a, -a) == pytest.approx(-1.0)
    assert numerics.sqnr_db(a, a) == float("inf")
    noise = np.array([0.1, 0.0, 0.0])
    assert numerics.sqnr_db(a, a + noise) == pytest.approx(10 * np.log10(14 / 0.01))
