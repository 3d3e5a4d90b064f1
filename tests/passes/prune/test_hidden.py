"""Hidden-size pruning (``hidden=R``) on small hand-built transformer graphs, against numpy.

The reference is a numpy forward pass of the same architecture with the
original weights sliced at the kept hidden channels, which are read back from
the pruned embedding table (never from kiln's plan). The norms then average
over the kept channels only: that is what hidden-size pruning means, so the
reference does the same.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from tests.passes.prune import initializer, kept_indices, make_model, node_weight, prune, run, tensor, weight
from tests.passes.prune.test_coupling import _attention_model

B, S, V, D, F = 2, 5, 11, 16, 24
WEAK = np.array([1, 4, 6, 9, 12, 13, 14, 15])  # hidden channels made small in every tensor that holds them


def _ids(rng):
    return rng.integers(0, V, (B, S)).astype(np.int64)


def _shrink_weak(inits):
    """Scale the WEAK hidden channels down in every tensor that holds them: l2 must prune exactly those."""
    out = dict(inits)
    for name, axis in (("emb", 1), ("pos", 1), ("g0", 0), ("b0", 0), ("g1", 0), ("b1", 0), ("w1", 0), ("w2", 1),
                       ("b2", 0)):
        if name not in out:
            continue
        a = out[name].copy()
        idx = [slice(None)] * a.ndim
        idx[axis] = WEAK
        a[tuple(idx)] *= 0.01
        out[name] = a
    return out


def _layer_norm(x, g, b, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * g + b


def _rms_norm(x, g, eps=1e-6):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g


def _encoder():
    """Embedding + position, LayerNorm, an FFN with a residual, a final LayerNorm that is the output."""
    rng = np.random.default_rng(40)
    inits = {"emb": weight(rng, V, D), "pos": weight(rng, S, D),
             "g0": rng.uniform(0.5, 1.5, D).astype(np.float32), "b0": weight(rng, D),
             "w1": weight(rng, D, F), "w2": weight(rng, F, D), "b2": weight(rng, D),
             "g1": rng.uniform(0.5, 1.5, D).astype(np.float32), "b1": weight(rng, D)}
    inits = _shrink_weak(inits)
    n = helper.make_node
    nodes = [
        n("Gather", ["emb", "ids"], ["e"], name="embed"), n("Add", ["e", "pos"], ["h0"], name="add_pos"),
        n("LayerNormalization", ["h0", "g0", "b0"], ["x"], name="ln0", axis=-1),
        n("MatMul", ["x", "w1"], ["u"], name="up"), n("Relu", ["u"], ["r"], name="act"),
        n("MatMul", ["r", "w2"], ["d"], name="down"), n("Add", ["d", "b2"], ["d2"], name="down_bias"),
        n("Add", ["x", "d2"], ["h1"], name="residual"),
        n("LayerNormalization", ["h1", "g1", "b1"], ["y"], name="ln1", axis=-1),
    ]
    model = make_model(nodes, [tensor("ids", [B, S], TensorProto.INT64)], [tensor("y", [B, S, D])], inits)
    return model, inits


def _encoder_numpy(w, ids):
    x = _layer_norm(w["emb"][ids] + w["pos"], w["g0"], w["b0"])
    h = x + np.maximum(x @ w["w1"], 0) @ w["w2"] + w["b2"]
    return _layer_norm(h, w["g1"], w["b1"])


def test_hidden_size_of_an_encoder_keeps_the_output_size():
    model, inits = _encoder()
    ids = _ids(np.random.default_rng(41))
    pruned, report = prune(model, "hidden=0.5,round-to=1")
    (row,) = [g for g in report.groups if g["kind"] == "hidden"]
    assert (row["width_before"], row["width_after"]) == (D, D // 2)
    keep = kept_indices(inits["emb"], node_weight(pruned, "embed", 0), 1)
    np.testing.assert_array_equal(np.sort(keep), np.setdiff1d(np.arange(D), WEAK))
    # every coupled tensor is sliced at the same channels; the FFN width is untouched
    np.testing.assert_array_equal(node_weight(pruned, "up"), inits["w1"][keep])
    np.testing.assert_array_equal(node_weight(pruned, "down"), inits["w2"][:, keep])
    np.testing.assert_array_equal(node_weight(pruned, "ln1", 2), inits["b1"][keep])
    got = run(pruned, {"ids": ids})["y"]
    assert got.shape == (B, S, D), "the graph output keeps its declared size"
    sliced = {k: v[:, keep] if k in ("emb", "pos", "w2") else v[keep] for k, v in inits.items()}
    np.testing.assert_allclose(got[..., keep], _encoder_numpy(sliced, ids), rtol=1e-4, atol=1e-5)
    # the pruned positions hold the final LayerNorm's bias
    np.testing.assert_array_equal(got[..., WEAK], np.broadcast_to(inits["b1"][WEAK], (B, S, len(WEAK))))
    assert report.model["params_after"] < report.model["params_before"]


def test_hidden_is_its_own_ratio():
    model, _ = _encoder()
    _, report = prune(model, "channels=0.5,ffn=0.5,round-to=1")
    assert not [g for g in report.groups if g["kind"] == "hidden"]
    (left,) = [g for g in report.left_alone if g["kind"] == "hidden"]
    assert left["reasons"] == ["hidden=0 in the spec"]


def _decoder():
    """Embedding, a decomposed RMSNorm (Pow / ReduceMean / Sqrt / Div / Mul), gated FFN, RMSNorm, lm_head."""
    rng = np.random.default_rng(42)
    inits = {"emb": weight(rng, V, D), "pos": np.zeros((S, D), np.float32),
             "g0": rng.uniform(0.5, 1.5, D).astype(np.float32), "g1": rng.uniform(0.5, 1.5, D).astype(np.float32),
             "w1": weight(rng, D, F), "wg": weight(rng, D, F), "w2": weight(rng, F, D), "b2": np.zeros(D, np.float32),
             "head": weight(rng, D, V), "two": np.float32(2.0), "eps": np.float32(1e-6), "one": np.float32(1.0)}
    inits = _shrink_weak(inits)
    del inits["pos"], inits["b2"]
    inits["wg"][WEAK] *= 0.01
    inits["head"][WEAK] *= 0.01
    n = helper.make_node

    def rms(x, g, out, tag):
        return [n("Pow", [x, "two"], [f"{tag}_sq"], name=f"{tag}_pow"),
                n("ReduceMean", [f"{tag}_sq"], [f"{tag}_ms"], name=f"{tag}_mean", axes=[-1], keepdims=1),
                n("Add", [f"{tag}_ms", "eps"], [f"{tag}_mse"], name=f"{tag}_eps"),
                n("Sqrt", [f"{tag}_mse"], [f"{tag}_rms"], name=f"{tag}_sqrt"),
                n("Div", ["one", f"{tag}_rms"], [f"{tag}_inv"], name=f"{tag}_inv"),
                n("Mul", [x, f"{tag}_inv"], [f"{tag}_n"], name=f"{tag}_scale"),
                n("Mul", [g, f"{tag}_n"], [out], name=f"{tag}_gamma")]

    nodes = [n("Gather", ["emb", "ids"], ["h0"], name="embed")]
    nodes += rms("h0", "g0", "x", "norm0")
    nodes += [n("MatMul", ["x", "w1"], ["u"], name="up"), n("MatMul", ["x", "wg"], ["gt"], name="gate"),
              n("Sigmoid", ["gt"], ["sg"], name="sig"), n("Mul", ["gt", "sg"], ["silu"], name="silu"),
              n("Mul", ["silu", "u"], ["m"], name="glu"), n("MatMul", ["m", "w2"], ["d"], name="down"),
              n("Add", ["h0", "d"], ["h1"], name="residual")]
    nodes += rms("h1", "g1", "z", "norm1")
    nodes += [n("MatMul", ["z", "head"], ["logits"], name="lm_head")]
    model = make_model(nodes, [tensor("ids", [B, S], TensorProto.INT64)], [tensor("logits", [B, S, V])], inits)
    return model, inits


def _decoder_numpy(w, ids):
    h0 = w["emb"][ids]
    x = _rms_norm(h0, w["g0"])
    gate = x @ w["wg"]
    h1 = h0 + (gate / (1 + np.exp(-gate)) * (x @ w["w1"])) @ w["w2"]
    return _rms_norm(h1, w["g1"]) @ w["head"]


def test_hidden_size_of_a_decoder_with_rmsnorm():
    model, inits = _decoder()
    ids = _ids(np.random.default_rng(43))
    # without attention the FFN neurons are a plain channel group (``ffn=`` is for transformers)
    pruned, report = prune(model, "hidden=0.5,channels=0.25,round-to=1")
    keep = kept_indices(inits["emb"], node_weight(pruned, "embed", 0), 1)
    np.testing.assert_array_equal(np.sort(keep), np.setdiff1d(np.arange(D), WEAK))
    # the FFN lost neurons too: read which from the up projection's columns (rows already sliced by hidden)
    ffn_keep = kept_indices(inits["w1"][keep], node_weight(pruned, "up"), 1)
    assert len(ffn_keep) == F * 3 // 4
    sliced = {"emb": inits["emb"][:, keep], "g0": inits["g0"][keep], "g1": inits["g1"][keep],
              "w1": inits["w1"][np.ix_(keep, ffn_keep)], "wg": inits["wg"][np.ix_(keep, ffn_keep)],
              "w2": inits["w2"][np.ix_(ffn_keep, keep)], "head": inits["head"][keep]}
    got = run(pruned, {"ids": ids})["logits"]
    assert got.shape == (B, S, V)
    np.testing.assert_allclose(got, _decoder_numpy(sliced, ids), rtol=1e-4, atol=1e-5)
    assert not any(n.op_type in ("Pad", "Gather") and n.name != "embed" for n in pruned.graph.node), \
        "no output restore: the logits do not carry the hidden size"


def test_kv_head_count_and_repeat_count_sharing_one_constant():
    """GQA's repeat as transformers writes it: Expand to Concat(batch, kv_heads, n_rep, seq, head_dim), with the
    kv head count and the repeat count the same initializer (2): only the head count may change."""
    rng = np.random.default_rng(44)
    model, inits = _attention_model(rng, heads=4, kv_heads=2)
    graph = model.graph
    kept = [t for t in graph.initializer if t.name != "rep_shape"]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for name, value in {"b": 2, "s": 5, "two": 2, "hd": 8}.items():
        graph.initializer.append(onnx.numpy_helper.from_array(np.asarray([value], np.int64), name))
    nodes = [helper.make_node("Concat", ["b", "two", "two", "s", "hd"], [f"rep_{t}"], name=f"rep_concat_{t}", axis=0)
             for t in "kv"]  # one per Expand, as exported
    for node in graph.node:
        if node.op_type == "Expand":
            node.input[1] = f"rep_{node.name[0]}"
    nodes += list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    feeds = {"x": weight(rng, 2, 5, 32), "mask": np.zeros((2, 1, 5, 5), np.float32)}
    pruned, report = prune(model, "heads=0.5,protect=none")
    (row,) = [g for g in report.groups if g["kind"] == "heads"]
    assert (row["heads_after"], row["kv_heads_after"]) == (2, 1)
    for concat in [n for n in pruned.graph.node if n.name.startswith("rep_concat")]:
        assert [int(initializer(pruned, name)[0]) for name in concat.input] == [2, 1, 2, 5, 8]
    assert run(pruned, feeds)["y"].shape == (2, 5, 32)
