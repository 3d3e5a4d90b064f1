"""EfficientNet-Lite0, the MiniLM encoder and LLaMA/Qwen2/GPT-2-style decoders compile for x86_64 with
--emit tvm; `kiln run` matches onnxruntime on the original, at the export's shapes and at others (batch and
sequence stay symbolic in the library)."""

from __future__ import annotations

import pytest

import compiler
from tests import model_zoo as mz

from .helpers import assert_matches, kiln_run, ort_run

#: other shapes than the defaults (mz.DEFAULT_SHAPES): a batch of 2 images, one longer sentence
OTHER_SHAPES = {"efficientnet_lite0": {"batch": 2}, "minilm": {"batch": 1, "seq": 40},
                "llama": {"batch": 1, "seq": 9}, "qwen2": {"batch": 3, "seq": 5}, "gpt2": {"batch": 1, "seq": 17}}


@pytest.mark.slow
@pytest.mark.parametrize("name", mz.MODELS)
def test_zoo_model_matches_onnxruntime(tmp_path, zoo_dir, name):
    source = mz.export(name, zoo_dir)
    art = compiler.compile(str(source), target="x86_64-linux-gnu", emit="tvm", output=tmp_path / "art")
    verification = art.manifest["verification"]
    assert verification.get("passed"), verification  # the driver ran it against onnxruntime too
    assert art.manifest["backend"]["schedule"] == "kiln-cpu"
    for i, shape in enumerate([{}, OTHER_SHAPES[name]]):
        inputs = mz.sample_inputs(name, **shape)
        run_dir = tmp_path / f"run{i}"
        run_dir.mkdir()
        assert_matches(ort_run(source, inputs), kiln_run(art.path, inputs, run_dir))
