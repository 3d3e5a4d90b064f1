"""Every light model shipped in the onnx wheel compiles for x86_64 with --emit tvm, and `kiln run` of the
artifact matches onnxruntime on the original model (fp32: rtol 1e-3, atol 1e-4)."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

import compiler
from compiler.signature import random_inputs

from .helpers import assert_matches, kiln_run, ort_run

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
MODELS = sorted(p.stem.removeprefix("light_") for p in LIGHT.glob("light_*.onnx"))
#: the three with hundreds of MB of weights keep them outside lib.so (a 500 MB .so is slow to link)
EXTERNAL = {"bvlc_alexnet", "vgg19", "zfnet512"}


def test_the_wheel_has_the_nine_light_models():
    assert len(MODELS) == 9, MODELS


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_light_model_matches_onnxruntime(tmp_path, name):
    source = LIGHT / f"light_{name}.onnx"
    params = "external" if name in EXTERNAL else "embedded"
    art = compiler.compile(str(source), target="x86_64-linux-gnu", emit="tvm", output=tmp_path / "art",
                           verify=False, params=params)
    assert art.manifest["entry"] == "lib.so"
    assert art.manifest["backend"]["params"]["mode"] == params
    inputs = random_inputs(art.inputs, seed=1)
    got = kiln_run(art.path, inputs, tmp_path)
    assert_matches(ort_run(source, inputs), got)
