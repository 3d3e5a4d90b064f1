"""ONNX graphs packaged with --emit mlc: run through the loader, compared with onnxruntime."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from compiler import cli
from compiler.api import load_artifact
from compiler.errors import ArtifactError
from targets.mlc import loader
from tests.targets.mlc.conftest import CNN


def _ort(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def _fresh_runner(art):
    """A runner built from the files on disk (not the one the compile verified with)."""
    return loader.load(art.path, load_artifact(art.path).manifest)


def test_cnn_matches_onnxruntime(cnn_package):
    files = {f["path"] for f in cnn_package.manifest["files"]}
    assert files == {"lib.so", "tensor-cache.json", "params_shard_0.bin"}
    assert cnn_package.manifest["verification"]["passed"]
    runner = _fresh_runner(cnn_package)
    assert isinstance(runner, loader.GraphRunner)
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    name = cnn_package.inputs[0]["name"]
    ours, ref = runner.run({name: x}), _ort(CNN, {name: x})
    for key in ref:
        np.testing.assert_allclose(ours[key], ref[key], rtol=1e-4, atol=1e-5)


def test_weights_live_outside_the_library(cnn_package):
    index = json.loads((cnn_package.path / "tensor-cache.json").read_text())
    names = [r["name"] for s in index["records"] for r in s["records"]]
    assert names == cnn_package.manifest["backend"]["params"]
    weights = loader.open_weights(cnn_package.path)
    lib = (cnn_package.path / "lib.so").read_bytes()
    for name in names:
        raw = np.ascontiguousarray(weights.arrays[name]).tobytes()
        assert raw[:64] not in lib, f"{name} is embedded in lib.so"


@pytest.mark.parametrize("batch,seq", [(2, 64), (1, 23)])
def test_minilm_matches_onnxruntime(minilm, batch, seq):
    """Real sentences, two shapes through one library (batch and sequence are symbolic)."""
    from tests import model_zoo

    path, art = minilm
    assert art.manifest["verification"]["passed"]
    feeds = model_zoo.sentence_batch(batch, seq)
    ours, ref = _fresh_runner(art).run(feeds), _ort(path, feeds)
    assert set(ours) == set(ref)
    for key in ref:
        assert ours[key].shape == ref[key].shape
        np.testing.assert_allclose(ours[key], ref[key], rtol=1e-3, atol=2e-5)


def test_flipped_byte_in_a_shard_is_caught_by_md5(cnn_package, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(cnn_package.path, pkg)
    shard = pkg / "params_shard_0.bin"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0x10
    shard.write_bytes(bytes(data))
    manifest = load_artifact(pkg).manifest
    with pytest.raises(ArtifactError, match=r"params_shard_0\.bin: md5 [0-9a-f]{32} does not match"):
        loader.load(pkg, manifest)


def test_kiln_run_refuses_a_missing_shard(cnn_package, tmp_path, capsys):
    pkg = tmp_path / "pkg"
    shutil.copytree(cnn_package.path, pkg)
    assert cli.main(["run", str(pkg)]) == 0
    (pkg / "params_shard_0.bin").unlink()
    assert cli.main(["run", str(pkg)]) == 1
    err = capsys.readouterr().err
    assert "kiln: error:" in err and "params_shard_0.bin" in err and "Traceback" not in err
