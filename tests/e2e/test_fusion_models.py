"""Real models through ``compiler.compile`` at -O2 and -O3 (x86_64-linux-gnu, emit onnx).

For each model the artifact must compute what onnxruntime computes on the
original (fp32 rtol 1e-3, atol 1e-4: fusions reassociate float arithmetic)
and its graph must not have more nodes than the original's.

- The model zoo (``tests/model_zoo.py``): EfficientNet-Lite0 and
  all-MiniLM-L6-v2 with their real weights on real inputs (photos, tokenized
  sentences), and tiny seeded Llama / Qwen2 / GPT-2 decoders (right-padded batch).
- The onnx wheel's light CNNs with seeded random weights frozen in as
  initializers (``freeze``), so the weight fusions can fire. alexnet, vgg19
  and zfnet512 are left out here: 230-550 MB of fp32 weights once frozen,
  10-20 s a compile on two cores, and nothing a smaller CNN does not
  exercise; ``tests/passes/fusion/test_conv_corpus.py`` runs the fusions over
  all nine.
- The onnx wheel's pytorch-converted models with their own test inputs.

Every package these need is a test dependency: a missing one fails the test.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

import compiler
from tests import corpus, model_zoo
from tests.passes.fusion.test_conv_corpus import _feeds as light_feeds
from tests.passes.fusion.test_conv_corpus import freeze

pytestmark = pytest.mark.slow

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGET = "x86_64-linux-gnu"
RTOL, ATOL = 1e-3, 1e-4
LEVELS = (2, 3)

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
#: The light CNNs small enough to freeze and compile twice in a few seconds.
LIGHT = ("densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet", "squeezenet")


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zoo")


def node_count(path: str | os.PathLike) -> int:
    return len(onnx.load(str(path), load_external_data=False).graph.node)


_EXPECTED: dict[str, dict[str, np.ndarray]] = {}


def ort_outputs(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """onnxruntime's outputs of the original (cached per path: -O2 and -O3 share them)."""
    key = str(path)
    if key not in _EXPECTED:
        _EXPECTED[key] = corpus.ort_run(path, feeds)
    return _EXPECTED[key]


def compile_and_check(path: Path, feeds: dict[str, np.ndarray], opt_level: int, out: Path) -> tuple[int, int]:
    """Compile ``path`` at ``opt_level``; assert same outputs and no more nodes; (before, after)."""
    expected = ort_outputs(path, feeds)
    art = compiler.compile(str(path), target=TARGET, emit="onnx", opt_level=opt_level, output=out)
    actual = art.run(feeds)
    assert list(actual) == list(expected), "output names changed"
    for name, want in expected.items():
        np.testing.assert_allclose(actual[name], want, rtol=RTOL, atol=ATOL, err_msg=f"{path.name} -O{opt_level} output {name}")
    before, after = node_count(path), node_count(Path(art.path) / "model.onnx")
    assert after <= before, f"{path.name} -O{opt_level}: {before} -> {after} nodes"
    return before, after


@pytest.mark.parametrize("opt_level", LEVELS)
@pytest.mark.parametrize("name", model_zoo.MODELS)
def test_zoo_model(name, opt_level, zoo_dir, tmp_path):
    path = model_zoo.export(name, zoo_dir)
    feeds = model_zoo.sample_inputs(name)
    before, after = compile_and_check(path, feeds, opt_level, tmp_path / "out")
    assert after < before, f"{name} -O{opt_level}: nothing removed ({before} nodes)"


def frozen_light(name: str, folder: Path) -> Path:
    """The light model with seeded weights as initializers (unused graph inputs dropped)."""
    path = folder / f"light_{name}.onnx"
    if not path.exists():
        proto = freeze(onnx.load(str(DATA / "light" / f"light_{name}.onnx")))
        used = {i for node in proto.graph.node for i in node.input} | {o.name for o in proto.graph.output}
        inputs = [i for i in proto.graph.input if i.name in used]
        del proto.graph.input[:]
        proto.graph.input.extend(inputs)
        onnx.save(proto, str(path))
    return path


@pytest.mark.parametrize("opt_level", LEVELS)
@pytest.mark.parametrize("name", LIGHT)
def test_light_model(name, opt_level, zoo_dir, tmp_path):
    path = frozen_light(name, zoo_dir)
    feeds = light_feeds(onnx.load(str(path), load_external_data=False))
    before, after = compile_and_check(path, feeds, opt_level, tmp_path / "out")
    assert after < before, f"{name} -O{opt_level}: nothing removed ({before} nodes)"


@pytest.mark.parametrize("opt_level", LEVELS)
def test_pytorch_converted_models(opt_level, tmp_path):
    """Each pytorch-converted model onnxruntime runs, with its test_data_set_0 inputs."""
    checked, failures = 0, []
    for i, case in enumerate(c for c in corpus.file_cases() if c.group == "pytorch-converted"):
        try:
            expected = corpus.ort_run(case.model, case.inputs)
        except Exception:  # noqa: BLE001 - a model onnxruntime cannot run is not ours to check
            continue
        art = compiler.compile(case.model, target=TARGET, emit="onnx", opt_level=opt_level, output=tmp_path / f"a{i}")
        reason = corpus.outputs_equal(expected, art.run(case.inputs), RTOL, ATOL)
        before, after = node_count(case.model), node_count(Path(art.path) / "model.onnx")
        if after > before:
            reason = f"{before} -> {after} nodes"
        if reason:
            failures.append(f"{case.name}: {reason}")
        checked += 1
    assert checked >= 50, f"only {checked} pytorch-converted models ran in onnxruntime"
    assert not failures, "; ".join(failures)


#: (batch, sequence) pairs other than the default: the shape math -O3 folds (copy
#: dims, one -1 per Reshape, Expand targets) must hold for every size, 1 included.
OTHER_SHAPES = ((1, 1), (3, 7))


@pytest.mark.parametrize("name", model_zoo.TRANSFORMERS)
def test_o3_transformer_at_other_batch_and_sequence_sizes(name, zoo_dir, tmp_path):
    path = model_zoo.export(name, zoo_dir)
    art = compiler.compile(str(path), target=TARGET, emit="onnx", opt_level=3, output=tmp_path / "out")
    for batch, seq in OTHER_SHAPES:
        feeds = model_zoo.sample_inputs(name, batch=batch, seq=seq)
        expected = corpus.ort_run(path, feeds)
        actual = art.run(feeds)
        for key, want in expected.items():
            np.testing.assert_allclose(actual[key], want, rtol=RTOL, atol=ATOL,
                                       err_msg=f"{name} -O3 at batch {batch}, sequence {seq}: output {key}")
