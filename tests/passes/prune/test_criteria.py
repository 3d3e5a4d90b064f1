"""Criteria against numpy, selection (local / global, round-to, protection) and the --prune spec."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from compiler.errors import KilnError
from passes.prune import parse_prune
from passes.prune.criteria import default_round_to
from targets.triple import resolve_target
from tests.passes.prune import kept_indices, make_model, node_weight, prune, run, tensor, weight


def _two_layer(rng, channels=16, bn=False):
    """x -> conv1 (3 -> channels) [-> BatchNorm] -> Relu -> conv2 (channels -> 4)."""
    inits = {"w1": weight(rng, channels, 3, 3, 3), "w2": weight(rng, 4, channels, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1])]
    src = "a"
    if bn:
        inits.update(g=rng.uniform(0.1, 2.0, channels).astype(np.float32), b=weight(rng, channels),
                     m=weight(rng, channels), v=rng.uniform(0.5, 1.5, channels).astype(np.float32))
        nodes.append(helper.make_node("BatchNormalization", ["a", "g", "b", "m", "v"], ["n"], name="bn"))
        src = "n"
    nodes += [helper.make_node("Relu", [src], ["r"], name="relu"),
              helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    model = make_model(nodes, [tensor("x", [1, 3, 6, 6])], [tensor("y", [1, 4, 6, 6])], inits)
    return model, inits


def _top(scores: np.ndarray, n: int) -> set[int]:
    return set(np.argsort(-scores, kind="stable")[:n].tolist())


@pytest.mark.parametrize("criterion,order", [("l1", 1), ("l2", 2)])
def test_magnitude_criteria_match_numpy(criterion, order):
    rng = np.random.default_rng(10)
    model, inits = _two_layer(rng)
    pruned, _ = prune(model, f"channels=0.5,criterion={criterion},round-to=1,protect=none")
    keep = set(kept_indices(inits["w1"], node_weight(pruned, "conv1"), 0).tolist())

    def norm(w, axis):
        flat = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.float64)
        n = np.abs(flat).sum(1) if order == 1 else np.sqrt((flat**2).sum(1))
        return n / n.mean()

    # each channel: the mean of its output filter's and its input column's norm, each relative to its layer
    scores = (norm(inits["w1"], 0) + norm(inits["w2"], 1)) / 2
    assert keep == _top(scores, 8)


def test_bn_gamma_keeps_the_largest_scales():
    rng = np.random.default_rng(11)
    model, inits = _two_layer(rng, bn=True)
    pruned, _ = prune(model, "channels=0.25,criterion=bn-gamma,round-to=1,protect=none")
    keep = set(kept_indices(inits["w1"], node_weight(pruned, "conv1"), 0).tolist())
    assert keep == _top(np.abs(inits["g"]), 12)


def test_activation_criterion_weighs_columns_by_input_energy():
    rng = np.random.default_rng(12)
    model, inits = _two_layer(rng)
    batches = [{"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)} for _ in range(4)]
    pruned, _ = prune(model, "channels=0.5,criterion=activation,round-to=1,protect=none", calibration=batches)
    keep = set(kept_indices(inits["w1"], node_weight(pruned, "conv1"), 0).tolist())
    energy = np.zeros(16)
    for feed in batches:
        r = run(model, feed, ("r",))["r"].astype(np.float64)
        energy += (r**2).sum(axis=(0, 2, 3))
    column = np.sqrt((inits["w2"].astype(np.float64) ** 2).sum(axis=(0, 2, 3)))
    assert keep == _top(np.sqrt(energy) * column, 8)


def test_activation_criterion_and_lstsq_need_calibration():
    rng = np.random.default_rng(13)
    model, _ = _two_layer(rng)
    with pytest.raises(KilnError, match="needs calibration data"):
        prune(model, "channels=0.5,criterion=activation")
    with pytest.raises(KilnError, match="lstsq needs calibration data"):
        prune(model, "channels=0.5", recover="lstsq")


def test_round_to_and_ratio():
    rng = np.random.default_rng(14)
    model, _ = _two_layer(rng, channels=32)
    for spec, kept in (("channels=0.3,round-to=8", 24), ("channels=0.3,round-to=1", 22),
                       ("channels=0.6,round-to=8", 16), ("channels=0.9,round-to=8", 8)):
        pruned, _ = prune(model, spec + ",protect=none")
        assert node_weight(pruned, "conv1").shape[0] == kept, spec


def test_round_to_defaults_to_the_targets_vector_width():
    assert default_round_to(resolve_target("x86_64-linux-gnu")) == 8  # x86-64-v2: 128-bit SSE
    assert default_round_to(resolve_target("aarch64-linux-gnu")) == 8  # NEON
    assert default_round_to(resolve_target("riscv64-linux-gnu")) == 1  # no vector extension in the spec
    assert default_round_to(resolve_target("x86_64-linux-gnu", "cuda")) == 8

    class Avx:
        device, features, llvm = "cpu", ("avx2", "fma"), {"mattr": []}

    class Avx512:
        device, features, llvm = "cpu", ("avx512f",), {"mattr": []}

    assert default_round_to(Avx()) == 16 and default_round_to(Avx512()) == 32


def test_first_layer_is_protected_by_default_and_named_layers_on_request():
    rng = np.random.default_rng(15)
    model, inits = _two_layer(rng)
    pruned, report = prune(model, "channels=0.5,round-to=1")
    assert node_weight(pruned, "conv1").shape[0] == 16
    assert any("first layer" in r for g in report.left_alone for r in g["reasons"])
    # three layers: protecting the middle one by name keeps its outputs
    inits = {"w1": weight(rng, 8, 3, 3, 3), "w2": weight(rng, 8, 8, 3, 3), "w3": weight(rng, 4, 8, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[1] * 4),
             helper.make_node("Conv", ["a", "w2"], ["b"], name="c2", pads=[1] * 4),
             helper.make_node("Conv", ["b", "w3"], ["y"], name="c3")]
    model = make_model(nodes, [tensor("x", [1, 3, 5, 5])], [tensor("y", [1, 4, 5, 5])], inits)
    pruned, _ = prune(model, "channels=0.5,round-to=1,protect=c2")  # replaces the default: c1 is not protected
    assert node_weight(pruned, "c1").shape[0] == 4 and node_weight(pruned, "c2").shape[0] == 8
    pruned, _ = prune(model, "channels=0.5,round-to=1,protect=first+c2")
    assert node_weight(pruned, "c1").shape[0] == 8 and node_weight(pruned, "c2").shape[0] == 8
    pruned, _ = prune(model, "channels=0.5,round-to=1,protect=none")
    assert node_weight(pruned, "c1").shape[0] == 4 and node_weight(pruned, "c2").shape[0] == 4


def test_global_scope_takes_more_from_the_group_with_weak_channels():
    rng = np.random.default_rng(16)
    inits = {"w1": weight(rng, 16, 3, 1, 1), "w2": weight(rng, 16, 16, 1, 1), "w3": weight(rng, 4, 16, 1, 1)}
    inits["w1"][8:] *= 0.01  # conv1 has eight near-dead filters; conv2's are all alike
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1"), helper.make_node("Relu", ["a"], ["ra"], name="r1"),
             helper.make_node("Conv", ["ra", "w2"], ["b"], name="c2"), helper.make_node("Relu", ["b"], ["rb"], name="r2"),
             helper.make_node("Conv", ["rb", "w3"], ["y"], name="c3")]
    model = make_model(nodes, [tensor("x", [1, 3, 4, 4])], [tensor("y", [1, 4, 4, 4])], inits)
    local, _ = prune(model, "channels=0.4,round-to=1,protect=none,criterion=l1")
    glob, _ = prune(model, "channels=0.4,round-to=1,protect=none,criterion=l1,scope=global")
    assert node_weight(local, "c1").shape[0] == node_weight(local, "c2").shape[0] == 10
    assert node_weight(glob, "c1").shape[0] < node_weight(glob, "c2").shape[0]
    assert node_weight(glob, "c1").shape[0] + node_weight(glob, "c2").shape[0] in (19, 20, 21)


@pytest.mark.parametrize("spec,message", [
    ("chanels=0.3", "unknown key 'chanels' (did you mean channels?)"),
    ("channels=1.5", "channels=1.5 must be in [0, 1)"),
    ("channels=abc", "channels='abc' is not a number"),
    ("channels=0.3,criterion=l3", "unknown criterion 'l3'"),
    ("channels=0.3,scope=world", "scope='world': expected local or global"),
    ("channels=0.3,round-to=0", "round-to='0' must be a positive integer"),
    ("channels", "'channels' is not KEY=VALUE"),
    ("criterion=l1", "nothing to prune"),
    ("channels=0.2,channels=0.3", "'channels' is given twice"),
    ("hidden=1", "hidden=1 must be in [0, 1)"),
])
def test_bad_specs_name_the_bad_part(spec, message):
    with pytest.raises(KilnError) as err:
        parse_prune(spec)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_spec_round_trip():
    options = parse_prune("channels=0.3,heads=0.25,ffn=0.2,hidden=0.1,criterion=l2", "lstsq")
    assert (options.channels, options.heads, options.ffn, options.hidden, options.criterion, options.recover) == (
        0.3, 0.25, 0.2, 0.1, "l2", "lstsq")
    assert parse_prune(options.spec()) == dataclass_replace(options, recover="none")
    with pytest.raises(KilnError, match="--prune-recover 'ridge'"):
        parse_prune("channels=0.3", "ridge")


def dataclass_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)
