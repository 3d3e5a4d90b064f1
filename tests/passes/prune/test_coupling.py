"""Each coupling case on a small hand-built graph: pruned shapes, and that what is kept computes exactly
what it computed before.

The reference for the exactness check is the *original* model with the input
columns of the pruned channels zeroed in the layers that read them: it must
give the pruned model's outputs, and every kept channel of every intermediate
value must equal the original's.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from tests.passes.prune import (
    kept_indices,
    make_model,
    node_weight,
    params,
    prune,
    run,
    tensor,
    weight,
    with_initializers,
)

RTOL, ATOL = 1e-5, 1e-5


def conv(name, x, w, out, group=1, bias=None, pads=1):
    inputs = [x, w] + ([bias] if bias else [])
    k = 1 if pads == 0 else 3
    return helper.make_node("Conv", inputs, [out], name=name, group=group, pads=[pads] * 4, kernel_shape=[k, k])


def assert_close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


def test_residual_block_keeps_one_channel_set():
    rng = np.random.default_rng(0)
    inits = {"w1": weight(rng, 16, 4, 3, 3), "b1": weight(rng, 16), "w2": weight(rng, 16, 16, 3, 3),
             "w3": weight(rng, 8, 16, 1, 1), "g": rng.uniform(0.5, 1.5, 16).astype(np.float32),
             "beta": weight(rng, 16), "mean": weight(rng, 16), "var": rng.uniform(0.5, 1.5, 16).astype(np.float32)}
    nodes = [
        conv("conv1", "x", "w1", "c1", bias="b1"),
        helper.make_node("BatchNormalization", ["c1", "g", "beta", "mean", "var"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r1"], name="relu1"),
        conv("conv2", "r1", "w2", "c2"),
        helper.make_node("Add", ["c2", "r1"], ["sum"], name="add"),  # the residual: both sides coupled
        helper.make_node("Relu", ["sum"], ["r2"], name="relu2"),
        conv("conv3", "r2", "w3", "y", pads=0),
    ]
    model = make_model(nodes, [tensor("x", [1, 4, 8, 8])], [tensor("y", [1, 8, 8, 8])], inits)
    pruned, report = prune(model, "channels=0.5,round-to=1,protect=none")

    keep = kept_indices(inits["w1"], node_weight(pruned, "conv1"), 0)
    assert len(keep) == 8
    w2 = node_weight(pruned, "conv2")
    assert w2.shape == (8, 8, 3, 3) and node_weight(pruned, "conv3").shape == (8, 8, 1, 1)
    # conv2 keeps the same output channels as conv1 (the Add couples them), and reads the same inputs
    np.testing.assert_array_equal(w2, inits["w2"][keep][:, keep])
    np.testing.assert_array_equal(node_weight(pruned, "bn"), inits["g"][keep])

    x = {"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)}
    drop = np.setdiff1d(np.arange(16), keep)
    masked_w2, masked_w3 = inits["w2"].copy(), inits["w3"].copy()
    masked_w2[:, drop] = 0
    masked_w3[:, drop] = 0
    reference = with_initializers(model, {"w2": masked_w2, "w3": masked_w3})
    want = run(reference, x, ("r1", "sum"))
    got = run(pruned, x, ("r1", "sum"))
    assert_close(got["r1"], want["r1"][:, keep])
    assert_close(got["sum"], want["sum"][:, keep])
    assert_close(got["y"], want["y"])
    assert report.model["params_after"] < report.model["params_before"]
    assert params(pruned) == report.model["params_after"]


def test_concat_maps_channels_with_offsets():
    rng = np.random.default_rng(1)
    inits = {"wa": weight(rng, 8, 3, 3, 3), "wb": weight(rng, 16, 3, 3, 3), "wc": weight(rng, 4, 24, 1, 1)}
    nodes = [
        conv("conv_a", "x", "wa", "a"),
        conv("conv_b", "x", "wb", "b"),
        helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
        helper.make_node("Relu", ["cat"], ["r"], name="relu"),
        conv("conv_c", "r", "wc", "y", pads=0),
    ]
    model = make_model(nodes, [tensor("x", [1, 3, 6, 6])], [tensor("y", [1, 4, 6, 6])], inits)
    pruned, _ = prune(model, "channels=0.5,round-to=1,protect=none")
    ka = kept_indices(inits["wa"], node_weight(pruned, "conv_a"), 0)
    kb = kept_indices(inits["wb"], node_weight(pruned, "conv_b"), 0)
    assert (len(ka), len(kb)) == (4, 8)
    keep = np.concatenate([ka, 8 + kb])
    np.testing.assert_array_equal(node_weight(pruned, "conv_c"), inits["wc"][:, keep])

    x = {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)}
    masked = inits["wc"].copy()
    masked[:, np.setdiff1d(np.arange(24), keep)] = 0
    want = run(with_initializers(model, {"wc": masked}), x, ("cat",))
    got = run(pruned, x, ("cat",))
    assert_close(got["cat"], want["cat"][:, keep])
    assert_close(got["y"], want["y"])


def test_depthwise_conv_prunes_its_groups():
    rng = np.random.default_rng(2)
    inits = {"w1": weight(rng, 16, 3, 1, 1), "wd": weight(rng, 16, 1, 3, 3), "bd": weight(rng, 16),
             "w2": weight(rng, 8, 16, 1, 1)}
    nodes = [
        conv("expand", "x", "w1", "e", pads=0),
        helper.make_node("Clip", ["e", "lo", "hi"], ["e6"], name="relu6"),
        conv("dw", "e6", "wd", "d", group=16, bias="bd"),
        helper.make_node("Relu", ["d"], ["r"], name="relu"),
        conv("project", "r", "w2", "y", pads=0),
    ]
    inits["lo"], inits["hi"] = np.float32(0), np.float32(6)
    model = make_model(nodes, [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 8, 8, 8])], inits)
    pruned, _ = prune(model, "channels=0.25,round-to=4,protect=none")
    keep = kept_indices(inits["w1"], node_weight(pruned, "expand"), 0)
    assert len(keep) == 12
    dw = next(n for n in pruned.graph.node if n.name == "dw")
    assert helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == 12
    np.testing.assert_array_equal(node_weight(pruned, "dw"), inits["wd"][keep])
    np.testing.assert_array_equal(node_weight(pruned, "dw", 2), inits["bd"][keep])

    x = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    masked = inits["w2"].copy()
    masked[:, np.setdiff1d(np.arange(16), keep)] = 0
    want = run(with_initializers(model, {"w2": masked}), x, ("d",))
    got = run(pruned, x, ("d",))
    assert_close(got["d"], want["d"][:, keep])
    assert_close(got["y"], want["y"])


def test_grouped_conv_keeps_every_group_equally_wide():
    rng = np.random.default_rng(3)
    groups = 4
    inits = {"w1": weight(rng, 16, 3, 1, 1), "wg": weight(rng, 16, 4, 3, 3), "w3": weight(rng, 8, 16, 1, 1)}
    nodes = [
        conv("conv1", "x", "w1", "a", pads=0),
        helper.make_node("Relu", ["a"], ["ra"], name="relu1"),
        conv("grouped", "ra", "wg", "g", group=groups),
        helper.make_node("Relu", ["g"], ["rg"], name="relu2"),
        conv("conv3", "rg", "w3", "y", pads=0),
    ]
    model = make_model(nodes, [tensor("x", [1, 3, 6, 6])], [tensor("y", [1, 8, 6, 6])], inits)
    pruned, _ = prune(model, "channels=0.5,round-to=1,protect=none")
    k1 = kept_indices(inits["w1"], node_weight(pruned, "conv1"), 0)
    wg = node_weight(pruned, "grouped")
    # every group keeps as many input and output channels as the others
    counts_in = np.bincount(k1 // 4, minlength=groups)
    assert len(set(counts_in)) == 1 and 0 < counts_in[0] < 4
    assert wg.shape[1] == counts_in[0] and wg.shape[0] % groups == 0
    # which filters of the grouped conv survived: match against the original filters cut to the kept inputs
    per_group_in = [k1[k1 // 4 == g] - 4 * g for g in range(groups)]
    cut = np.concatenate([inits["wg"][4 * g : 4 * g + 4][:, per_group_in[g]] for g in range(groups)])
    k2 = kept_indices(cut, wg, 0)
    assert len(set(np.bincount(k2 // 4, minlength=groups))) == 1

    x = {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)}
    masked_g, masked_3 = inits["wg"].copy(), inits["w3"].copy()
    for c in np.setdiff1d(np.arange(16), k1):  # input channel c feeds column c % 4 of group c // 4's filters
        masked_g[4 * (c // 4) : 4 * (c // 4) + 4, c % 4] = 0
    masked_3[:, np.setdiff1d(np.arange(16), k2)] = 0
    want = run(with_initializers(model, {"wg": masked_g, "w3": masked_3}), x, ("g",))
    got = run(pruned, x, ("g",))
    assert_close(got["g"], want["g"][:, k2])
    assert_close(got["y"], want["y"])


@pytest.mark.parametrize("op", ["Flatten", "Reshape"])
def test_gemm_after_flatten_prunes_blocks_of_features(op):
    rng = np.random.default_rng(4)
    inits = {"w1": weight(rng, 8, 3, 3, 3), "wf": weight(rng, 8 * 16, 10), "bf": weight(rng, 10)}
    flat = (helper.make_node("Flatten", ["r"], ["f"], name="flat", axis=1) if op == "Flatten"
            else helper.make_node("Reshape", ["r", "shape"], ["f"], name="flat"))
    if op == "Reshape":
        inits["shape"] = np.asarray([1, 128], dtype=np.int64)  # the explicit size must be rewritten
    nodes = [
        conv("conv", "x", "w1", "c"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        flat,
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc"),
    ]
    model = make_model(nodes, [tensor("x", [1, 3, 4, 4])], [tensor("y", [1, 10])], inits)
    pruned, _ = prune(model, "channels=0.5,round-to=1,protect=none")
    keep = kept_indices(inits["w1"], node_weight(pruned, "conv"), 0)
    rows = (keep[:, None] * 16 + np.arange(16)[None, :]).reshape(-1)
    np.testing.assert_array_equal(node_weight(pruned, "fc"), inits["wf"][rows])
    if op == "Reshape":
        assert list(node_weight(pruned, "flat")) == [1, len(keep) * 16]

    x = {"x": rng.standard_normal((1, 3, 4, 4)).astype(np.float32)}
    masked = inits["wf"].copy()
    masked[np.setdiff1d(np.arange(128), rows)] = 0
    want = run(with_initializers(model, {"wf": masked}), x)
    assert_close(run(pruned, x)["y"], want["y"])


def _attention_model(rng, batch=2, seq=5, dim=32, heads=4, kv_heads=2, head_dim=8):
    """A GQA attention block as torch exports it (static shapes: the head counts are constants)."""
    rep = heads // kv_heads
    inits = {
        "wq": weight(rng, dim, heads * head_dim), "wk": weight(rng, dim, kv_heads * head_dim),
        "wv": weight(rng, dim, kv_heads * head_dim), "wo": weight(rng, heads * head_dim, dim),
        "bq": weight(rng, heads * head_dim),
        "q_shape": np.asarray([batch, seq, heads, head_dim], np.int64),
        "kv_shape": np.asarray([batch, seq, kv_heads, head_dim], np.int64),
        "rep_shape": np.asarray([1, 1, rep, 1, 1], np.int64),
        "merged_kv": np.asarray([batch, heads, seq, head_dim], np.int64),
        "out_shape": np.asarray([batch, seq, heads * head_dim], np.int64),
        "axes2": np.asarray([2], np.int64), "scale": np.float32(head_dim ** -0.5),
    }
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "wq"], ["q0"], name="q_proj"), n("Add", ["q0", "bq"], ["q1"], name="q_bias"),
        n("MatMul", ["x", "wk"], ["k0"], name="k_proj"), n("MatMul", ["x", "wv"], ["v0"], name="v_proj"),
        n("Reshape", ["q1", "q_shape"], ["q2"], name="q_split"),
        n("Reshape", ["k0", "kv_shape"], ["k2"], name="k_split"),
        n("Reshape", ["v0", "kv_shape"], ["v2"], name="v_split"),
        n("Transpose", ["q2"], ["q"], name="q_t", perm=[0, 2, 1, 3]),
        n("Transpose", ["k2"], ["k"], name="k_t", perm=[0, 2, 1, 3]),
        n("Transpose", ["v2"], ["v"], name="v_t", perm=[0, 2, 1, 3]),
        # GQA: each kv head repeated for its query group
        n("Unsqueeze", ["k", "axes2"], ["k5"], name="k_unsq"), n("Expand", ["k5", "rep_shape"], ["k6"], name="k_rep"),
        n("Reshape", ["k6", "merged_kv"], ["kr"], name="k_merge"),
        n("Unsqueeze", ["v", "axes2"], ["v5"], name="v_unsq"), n("Expand", ["v5", "rep_shape"], ["v6"], name="v_rep"),
        n("Reshape", ["v6", "merged_kv"], ["vr"], name="v_merge"),
        n("Transpose", ["kr"], ["kt"], name="k_tt", perm=[0, 1, 3, 2]),
        n("MatMul", ["q", "kt"], ["s0"], name="qk"), n("Mul", ["s0", "scale"], ["s1"], name="scale_mul"),
        n("Add", ["s1", "mask"], ["s2"], name="mask_add"),
        n("Softmax", ["s2"], ["p"], name="softmax", axis=-1),
        n("MatMul", ["p", "vr"], ["o0"], name="pv"),
        n("Transpose", ["o0"], ["o1"], name="o_t", perm=[0, 2, 1, 3]),
        n("Reshape", ["o1", "out_shape"], ["o2"], name="o_merge"),
        n("MatMul", ["o2", "wo"], ["o3"], name="o_proj"),
        n("Add", ["o3", "x"], ["y"], name="residual"),
    ]
    inputs = [tensor("x", [batch, seq, dim]), tensor("mask", [batch, 1, seq, seq])]
    return make_model(nodes, inputs, [tensor("y", [batch, seq, dim])], inits), inits


def test_gqa_heads_prune_whole_kv_groups():
    rng = np.random.default_rng(5)
    model, inits = _attention_model(rng)
    pruned, report = prune(model, "heads=0.5,protect=none")  # q/k/v read the graph input
    (row,) = [g for g in report.groups if g["kind"] == "heads"]
    assert (row["heads_before"], row["kv_heads_before"], row["heads_after"], row["kv_heads_after"]) == (4, 2, 2, 1)
    kk = kept_indices(inits["wk"], node_weight(pruned, "k_proj"), 1)
    kq = kept_indices(inits["wq"], node_weight(pruned, "q_proj"), 1)
    (kv,) = set(kk // 8)
    # the kept kv head keeps its whole query group (heads 2kv, 2kv+1), head_dim unchanged
    np.testing.assert_array_equal(kq, np.arange(16 * kv, 16 * kv + 16))
    np.testing.assert_array_equal(kk, np.arange(8 * kv, 8 * kv + 8))
    np.testing.assert_array_equal(kept_indices(inits["wv"], node_weight(pruned, "v_proj"), 1), kk)
    np.testing.assert_array_equal(node_weight(pruned, "o_proj"), inits["wo"][kq])
    # the Reshape constants that spell head counts follow
    assert list(node_weight(pruned, "q_split")) == [2, 5, 2, 8]
    assert list(node_weight(pruned, "k_split")) == [2, 5, 1, 8]
    assert list(node_weight(pruned, "k_merge")) == [2, 2, 5, 8]
    assert list(node_weight(pruned, "o_merge")) == [2, 5, 16]

    feeds = {"x": rng.standard_normal((2, 5, 32)).astype(np.float32),
             "mask": np.where(rng.random((2, 1, 5, 5)) < 0.2, -1e4, 0).astype(np.float32)}
    masked = inits["wo"].copy()
    masked[np.setdiff1d(np.arange(32), kq)] = 0
    want = run(with_initializers(model, {"wo": masked}), feeds, ("o0",))
    got = run(pruned, feeds, ("o0",))
    assert_close(got["o0"], want["o0"][:, 2 * kv : 2 * kv + 2])  # the kept heads' attention is unchanged
    assert_close(got["y"], want["y"])


def test_channel_shuffle_is_a_permutation():
    rng = np.random.default_rng(6)
    g, c = 2, 16
    inits = {"w1": weight(rng, c, 3, 1, 1), "wa": weight(rng, c, c // g, 1, 1), "wd": weight(rng, c, 1, 3, 3),
             "wb": weight(rng, c, c // g, 1, 1), "w4": weight(rng, 4, c, 1, 1),
             "split": np.asarray([1, g, c // g, 5, 5], np.int64), "merge": np.asarray([1, c, 5, 5], np.int64)}
    n = helper.make_node
    nodes = [
        conv("conv1", "x", "w1", "a", pads=0), n("Relu", ["a"], ["ra"], name="relu1"),
        conv("gconv_a", "ra", "wa", "b", group=g, pads=0), n("Relu", ["b"], ["rb"], name="relu2"),
        n("Reshape", ["rb", "split"], ["s1"], name="shuffle_split"),
        n("Transpose", ["s1"], ["s2"], name="shuffle_t", perm=[0, 2, 1, 3, 4]),
        n("Reshape", ["s2", "merge"], ["s3"], name="shuffle_merge"),
        conv("dw", "s3", "wd", "d", group=c),
        conv("gconv_b", "d", "wb", "e", group=g, pads=0), n("Relu", ["e"], ["re"], name="relu3"),
        conv("conv4", "re", "w4", "y", pads=0),
    ]
    model = make_model(nodes, [tensor("x", [1, 3, 5, 5])], [tensor("y", [1, 4, 5, 5])], inits)
    pruned, _ = prune(model, "channels=0.5,round-to=1,protect=none")
    # gconv_a's outputs are pruned at the same position in both groups (the shuffle needs a product)
    wa = node_weight(pruned, "gconv_a")
    k1 = kept_indices(inits["w1"], node_weight(pruned, "conv1"), 0)
    cut = np.concatenate([inits["wa"][8 * i : 8 * i + 8][:, k1[k1 // 8 == i] - 8 * i] for i in range(g)])
    ka = kept_indices(cut, wa, 0)
    positions = [set(ka[ka // 8 == i] - 8 * i) for i in range(g)]
    assert positions[0] == positions[1] and 0 < len(positions[0]) < 8
    assert list(node_weight(pruned, "shuffle_split"))[2] == len(positions[0])
    shuffled = np.sort(np.asarray([(j % 8) * g + j // 8 for j in ka]))  # where the kept channels land

    feeds = {"x": rng.standard_normal((1, 3, 5, 5)).astype(np.float32)}
    drop_b = np.setdiff1d(np.arange(c), shuffled)
    masked_b = inits["wb"].copy()
    for ch in drop_b:
        masked_b[8 * (ch // 8) : 8 * (ch // 8) + 8, ch % 8] = 0
    masked_1 = inits["wa"].copy()
    for ch in np.setdiff1d(np.arange(c), k1):
        masked_1[8 * (ch // 8) : 8 * (ch // 8) + 8, ch % 8] = 0
    kb_cut = np.concatenate([inits["wb"][8 * i : 8 * i + 8][:, shuffled[shuffled // 8 == i] - 8 * i] for i in range(g)])
    kb = kept_indices(kb_cut, node_weight(pruned, "gconv_b"), 0)
    masked_4 = inits["w4"].copy()
    masked_4[:, np.setdiff1d(np.arange(c), kb)] = 0
    reference = with_initializers(model, {"wa": masked_1, "wb": masked_b, "w4": masked_4})
    want = run(reference, feeds, ("s3", "d"))
    got = run(pruned, feeds, ("s3", "d"))
    assert_close(got["s3"], want["s3"][:, shuffled])
    assert_close(got["d"], want["d"][:, shuffled])
    assert_close(got["y"], want["y"])


def test_groups_that_cannot_be_pruned_are_listed_with_the_reason():
    rng = np.random.default_rng(7)
    inits = {"w1": weight(rng, 8, 3, 3, 3), "w2": weight(rng, 8, 8, 3, 3), "w3": weight(rng, 4, 8, 1, 1)}
    nodes = [
        conv("conv1", "x", "w1", "a"),
        helper.make_node("LRN", ["a"], ["n"], name="lrn", size=3),
        conv("conv2", "n", "w2", "b"),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        conv("conv3", "r", "w3", "y", pads=0),
    ]
    model = make_model(nodes, [tensor("x", [1, 3, 6, 6])], [tensor("y", [1, 4, 6, 6]), tensor("r", [1, 8, 6, 6])], inits)
    pruned, report = prune(model, "channels=0.5,protect=none")
    reasons = " ".join(r for g in report.left_alone for r in g["reasons"])
    assert "LRN" in reasons and "'r' is a graph output" in reasons and "'y' is a graph output" in reasons
    assert params(pruned) == params(model)
