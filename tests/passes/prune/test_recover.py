"""--prune-recover lstsq: refitting the layer after a cut lowers the output error on calibration-like data."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from tests.passes.prune import make_model, prune, run, tensor, weight


def _redundant_mlp(rng):
    """x -> MatMul(16 -> 32) + b -> Relu -> MatMul(32 -> 8) + b; hidden units 16.. are half-size echoes of 0..15."""
    w1 = weight(rng, 16, 32)
    w1[:, 16:] = 0.5 * w1[:, :16] + 0.05 * weight(rng, 16, 16)
    inits = {"w1": w1, "b1": np.zeros(32, np.float32), "w2": weight(rng, 32, 8), "b2": weight(rng, 8)}
    n = helper.make_node
    nodes = [n("MatMul", ["x", "w1"], ["h0"], name="fc1"), n("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
             n("Relu", ["h1"], ["h"], name="relu"), n("MatMul", ["h", "w2"], ["y0"], name="fc2"),
             n("Add", ["y0", "b2"], ["y"], name="fc2_bias")]
    return make_model(nodes, [tensor("x", ["n", 16])], [tensor("y", ["n", 8])], inits)


def _redundant_cnn(rng):
    w1 = weight(rng, 16, 3, 3, 3)
    w1[8:] = 0.5 * w1[:8] + 0.05 * weight(rng, 8, 3, 3, 3)
    inits = {"w1": w1, "w2": weight(rng, 8, 16, 3, 3), "b2": weight(rng, 8)}
    n = helper.make_node
    nodes = [n("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1] * 4), n("Relu", ["a"], ["r"], name="relu"),
             n("Conv", ["r", "w2", "b2"], ["y"], name="conv2", pads=[1] * 4, strides=[2, 2])]
    return make_model(nodes, [tensor("x", ["n", 3, 8, 8])], [tensor("y", ["n", 8, 4, 4])], inits)


def _error(model, pruned, feeds) -> float:
    num = den = 0.0
    for feed in feeds:
        want, got = run(model, feed)["y"], run(pruned, feed)["y"]
        num += float(((want - got) ** 2).sum())
        den += float((want**2).sum())
    return (num / den) ** 0.5


@pytest.mark.parametrize("build,shape", [(_redundant_mlp, (32, 16)), (_redundant_cnn, (4, 3, 8, 8))])
def test_lstsq_refit_lowers_the_output_error(build, shape):
    rng = np.random.default_rng(20)
    model = build(rng)
    calibration = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(6)]
    held_out = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(3)]
    spec = "channels=0.5,round-to=1,protect=none"
    plain, _ = prune(model, spec)
    refit, report = prune(model, spec, calibration=calibration, recover="lstsq")
    (layer,) = [r for r in report.recovery if not r.get("skipped")]
    assert layer["relative_error_after"] < layer["relative_error_before"]
    e_plain, e_refit = _error(model, plain, calibration), _error(model, refit, calibration)
    assert e_refit < 0.5 * e_plain, (e_plain, e_refit)
    # and on data the refit never saw
    assert _error(model, refit, held_out) < 0.5 * _error(model, plain, held_out)


def test_layers_that_are_not_refit_say_why():
    rng = np.random.default_rng(21)
    inits = {"w1": weight(rng, 8, 3, 1, 1), "wg": weight(rng, 8, 4, 1, 1), "w3": weight(rng, 4, 8, 1, 1)}
    n = helper.make_node
    nodes = [n("Conv", ["x", "w1"], ["a"], name="c1"), n("Relu", ["a"], ["r"], name="relu"),
             n("Conv", ["r", "wg"], ["g"], name="grouped", group=2), n("Conv", ["g", "w3"], ["y"], name="c3")]
    model = make_model(nodes, [tensor("x", [1, 3, 4, 4])], [tensor("y", [1, 4, 4, 4])], inits)
    calibration = [{"x": rng.standard_normal((1, 3, 4, 4)).astype(np.float32)} for _ in range(3)]
    _, report = prune(model, "channels=0.5,round-to=1,protect=none", calibration=calibration, recover="lstsq")
    reasons = {r["layer"]: r.get("skipped", "") for r in report.recovery}
    assert "group 1" in reasons["grouped"]
