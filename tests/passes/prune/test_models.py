"""Real models pruned at 30 %: a valid model that onnxruntime runs, and the parameters it saves.

- The onnx wheel's light CNNs with seeded random weights frozen in as
  initializers (as the fusion tests do: their files hold ConstantOfShape fills
  that every weight input can override), and squeezenet and vgg19 exactly as
  shipped, to show fills are pruned in kind (vgg19 only so: frozen it is
  550 MB of weights, 20 s to make on two cores).
- EfficientNet-Lite0 with its real weights, all-MiniLM-L6-v2 and a tiny
  LLaMA-style decoder with GQA (30 % of the heads, the FFN neurons and the
  hidden size: half of MiniLM's parameters are its word-embedding table, which
  only the hidden size shrinks). The 25 % counts *all* parameters.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from passes.prune.stage import prune_path
from tests import model_zoo, transformer_models
from tests.passes.fusion.test_conv_corpus import _feeds as light_feeds
from tests.passes.prune import run

pytestmark = pytest.mark.slow

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"

#: light model -> the least share of parameters a 30 % channel prune must remove
LIGHT = {"resnet50": 0.25, "densenet121": 0.25, "inception_v1": 0.25, "inception_v2": 0.25,
         "squeezenet": 0.25, "shufflenet": 0.25}
TRANSFORMER_30 = "hidden=0.3,heads=0.3,ffn=0.3"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prune-models")


def _check(model: ir.Model, report, feeds: dict, minimum: float, key: str = "params") -> None:
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=False)
    outputs = run(proto, feeds, optimize=True)
    assert all(np.isfinite(v).all() for v in outputs.values())
    m = report.model
    before, after = m[f"{key}_before"], m[f"{key}_after"]
    assert after <= (1 - minimum) * before, f"{key}: {before} -> {after}"
    assert m["macs_after"] < m["macs_before"]


@pytest.mark.parametrize("name", sorted(LIGHT))
def test_light_models(name, folder):
    from tests.e2e.test_fusion_models import frozen_light

    path = frozen_light(name, folder)
    model, report = prune_path(str(path), "channels=0.3")
    proto = onnx.load(str(path), load_external_data=False)
    _check(model, report, light_feeds(proto), LIGHT[name])
    declared = [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output]
    assert [[d for d in o.shape] for o in model.graph.outputs] == declared


@pytest.mark.parametrize("name", ["squeezenet", "vgg19"])
def test_light_models_as_shipped_prune_their_constant_fills(name):
    path = DATA / f"light_{name}.onnx"
    model, report = prune_path(str(path), "channels=0.3")
    assert any(n.op_type == "ConstantOfShape" for n in model.graph), "the fills stay fills"
    proto = onnx.load(str(path))
    initialized = {t.name for t in proto.graph.initializer}
    feeds = {k: v for k, v in light_feeds(proto).items() if k not in initialized}
    _check(model, report, feeds, 0.25)


def test_efficientnet_lite0(folder):
    path = model_zoo.efficientnet_lite0(folder)
    model, report = prune_path(str(path), "channels=0.3")
    _check(model, report, model_zoo.sample_inputs("efficientnet_lite0"), 0.25)


def test_minilm_heads_ffn_and_hidden(folder):
    path = model_zoo.minilm(folder)
    model, report = prune_path(str(path), TRANSFORMER_30)
    heads = [g for g in report.groups if g["kind"] == "heads"]
    assert len(heads) == 6 and all((g["heads_before"], g["heads_after"]) == (12, 8) for g in heads)
    ffn = [g for g in report.groups if g["kind"] == "ffn"]
    assert len(ffn) == 6 and all(g["channels_after"] < g["channels_before"] for g in ffn)
    (hidden,) = [g for g in report.groups if g["kind"] == "hidden"]
    assert hidden["width_before"] == 384 and hidden["width_after"] <= 0.75 * 384
    assert "inner.embeddings.word_embeddings.weight" in {v.name for v in model.graph.initializers.values()}
    word = model.graph.initializers["inner.embeddings.word_embeddings.weight"].const_value
    assert tuple(word.shape) == (30522, hidden["width_after"])
    _check(model, report, model_zoo.sample_inputs("minilm", batch=2, seq=16), 0.25)
    assert [d for d in model.graph.outputs[0].shape][-1] == 384, "the last hidden state keeps its size"


def test_llama_decoder_with_gqa(folder):
    path = transformer_models.export("llama", opset=model_zoo.OPSET)
    model, report = prune_path(str(path), TRANSFORMER_30)
    heads = [g for g in report.groups if g["kind"] == "heads"]
    assert heads and all((g["heads_after"], g["kv_heads_after"]) == (2, 1) for g in heads)
    assert [g["width_after"] < g["width_before"] for g in report.groups if g["kind"] == "hidden"] == [True]
    _check(model, report, transformer_models.make_feeds(2, 9), 0.25)
