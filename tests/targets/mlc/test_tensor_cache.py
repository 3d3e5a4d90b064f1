"""The weight cache: MLC's tensor-cache.json layout, shards, md5 checks, memory-mapped loading."""

from __future__ import annotations

import json

import numpy as np
import pytest

from compiler.errors import ArtifactError
from targets.mlc import loader, tensor_cache


def _arrays(seed: int = 0) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        ("embed.weight", rng.standard_normal((600, 500)).astype(np.float32)),  # 1.2 MB: over a 1 MB shard
        ("norm.weight", rng.standard_normal(37).astype(np.float16)),  # odd size: the next record is padded
        ("proj.q_weight", rng.integers(0, 2**32, (400, 160), dtype=np.uint32)),
        ("proj.q_scale", rng.standard_normal((400, 20)).astype(np.float16)),
        ("ids", np.arange(11, dtype=np.int32)),
        ("scalar", np.asarray(7, dtype=np.int64)),  # 0-d stays 0-d
    ]


def test_layout_is_what_tvmjs_reads(tmp_path):
    import tvm
    from tvm.contrib import tvmjs

    arrays = _arrays()
    files = tensor_cache.write(arrays, tmp_path, shard_mb=1)
    index = json.loads((tmp_path / "tensor-cache.json").read_text())
    assert files == ["tensor-cache.json"] + [s["dataPath"] for s in index["records"]]
    assert [s["dataPath"] for s in index["records"]] == ["params_shard_0.bin", "params_shard_1.bin"]
    for shard in index["records"]:
        assert shard["format"] == "raw-shard" and len(shard["md5sum"]) == 32
        assert shard["nbytes"] == (tmp_path / shard["dataPath"]).stat().st_size
        assert shard["nbytes"] <= 1 << 20 or len(shard["records"]) == 1  # an oversized tensor gets its own
        for rec in shard["records"]:
            assert set(rec) == {"name", "shape", "dtype", "format", "nbytes", "byteOffset"}
            assert rec["byteOffset"] % 64 == 0
    assert index["metadata"]["ParamSize"] == sum(a.size for _, a in arrays)
    loaded, _meta = tvmjs.load_tensor_cache(str(tmp_path), tvm.cpu())
    assert sorted(loaded) == sorted(n for n, _ in arrays)
    for name, array in arrays:
        assert loaded[name].shape == array.shape
        np.testing.assert_array_equal(loaded[name].numpy(), array)


def test_loader_maps_without_copy(tmp_path):
    import tvm

    arrays = dict(_arrays())
    tensor_cache.write(arrays.items(), tmp_path)
    weights = loader.open_weights(tmp_path)
    assert isinstance(weights.arrays["embed.weight"].base, np.memmap)
    names = list(arrays)
    tensors = loader.to_tvm(weights.arrays, names, tvm.cpu())
    for name, t in zip(names, tensors):
        assert tuple(t.shape) == arrays[name].shape
        np.testing.assert_array_equal(t.numpy(), arrays[name])
    # zero copy: the TVM tensor's data is the mapped file's memory
    assert np.from_dlpack(tensors[0]).ctypes.data == weights.arrays["embed.weight"].ctypes.data


def test_same_input_same_bytes(tmp_path):
    tensor_cache.write(_arrays(), tmp_path / "a")
    tensor_cache.write(_arrays(), tmp_path / "b")
    for name in ("tensor-cache.json", "params_shard_0.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_flipped_byte_is_caught_by_md5(tmp_path):
    tensor_cache.write(_arrays(), tmp_path, shard_mb=1)
    shard = tmp_path / "params_shard_1.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"params_shard_1\.bin: md5 .* does not match .*corrupt"):
        loader.open_weights(tmp_path)


def test_missing_and_truncated_shards(tmp_path):
    tensor_cache.write(_arrays(), tmp_path, shard_mb=1)
    shard = tmp_path / "params_shard_0.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(ArtifactError, match="truncated or replaced"):
        loader.open_weights(tmp_path)
    shard.unlink()
    with pytest.raises(ArtifactError, match="params_shard_0.bin is missing"):
        loader.open_weights(tmp_path)
    with pytest.raises(ArtifactError, match="params_shard_0.bin is missing"):
        loader.open_weights(tmp_path, verify=False)


def test_hostile_index(tmp_path):
    tensor_cache.write(_arrays(), tmp_path)
    path = tmp_path / "tensor-cache.json"
    index = json.loads(path.read_text())
    index["records"][0]["dataPath"] = "../elsewhere.bin"
    path.write_text(json.dumps(index))
    with pytest.raises(ArtifactError, match="bad record"):
        tensor_cache.read_index(tmp_path)
    index["records"][0]["dataPath"] = "params_shard_0.bin"
    index["records"][0]["records"][0]["byteOffset"] = index["records"][0]["nbytes"]
    path.write_text(json.dumps(index))
    with pytest.raises(ArtifactError, match="bad record: embed.weight"):
        tensor_cache.read_index(tmp_path)
    path.write_text("{")
    with pytest.raises(ArtifactError, match="not a tensor cache index"):
        tensor_cache.read_index(tmp_path)
