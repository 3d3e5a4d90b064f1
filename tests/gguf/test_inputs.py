"""Hostile, broken and unsupported inputs: refused with one clear error, nothing executed,
no output left behind. And the other ways in: PyTorch .bin, sharded safetensors, GGUF files."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

import compiler
from compiler.errors import KilnError, ModelFormatError, UnsupportedError
from compiler.importers import import_source
from compiler.importers.safe_unpickle import TorchZip
from targets.gguf.format import Reader


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _gguf_tensors(path: Path) -> dict[str, tuple[int, bytes]]:
    reader = Reader(path)
    return {t.name: (t.type_id, bytes(reader.data(t))) for t in reader.tensors}


# --- PyTorch .bin through the restricted unpickler -------------------------------------------

class _Marker:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _torch_zip(path: Path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_is_refused_without_running(tmp_path, protocol):
    marker = tmp_path / "pwned"
    _torch_zip(tmp_path / "pytorch_model.bin", pickle.dumps({"w": _Marker(str(marker))}, protocol=protocol))
    with pytest.raises(ModelFormatError, match="refuses every other object") as err:
        TorchZip(tmp_path / "pytorch_model.bin")
    assert "open" in str(err.value)  # the refused global is named (io.open here)
    assert not marker.exists()


def test_os_system_in_a_checkpoint_folder_is_refused(tmp_path, checkpoints):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(checkpoints("llama") / "config.json", folder)
    marker = tmp_path / "pwned2"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    _torch_zip(folder / "pytorch_model.bin", pickle.dumps({"model.embed_tokens.weight": Evil()}))
    with pytest.raises(ModelFormatError, match="system"):
        compiler.compile(str(folder), emit="gguf", output=tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_legacy_non_zip_pickle_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ModelFormatError, match="not a zip-format"):
        TorchZip(tmp_path / "pytorch_model.bin")


def test_pytorch_bin_converts_like_safetensors(tmp_path, checkpoints):
    """A real torch.save state dict (read without torch) gives the same GGUF as the safetensors."""
    import torch
    from safetensors.torch import load_file

    src = checkpoints("qwen2")
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, folder)
    state = load_file(src / "model.safetensors")
    state = {k: (v.to(torch.bfloat16) if k.endswith("mlp.up_proj.weight") else v) for k, v in state.items()}
    torch.save(state, folder / "pytorch_model.bin")
    a = compiler.compile(str(src), emit="gguf", quantize="bf16", output=tmp_path / "a", verify=False)
    b = compiler.compile(str(folder), emit="gguf", quantize="bf16", output=tmp_path / "b", verify=False)
    assert b.manifest["source"]["format"] == "hf-pytorch"
    assert _gguf_tensors(a.path / "model.gguf") == _gguf_tensors(b.path / "model.gguf")


# --- safetensors -----------------------------------------------------------------------------

def test_sharded_safetensors(tmp_path, checkpoints):
    from safetensors.numpy import load_file, save_file

    src = checkpoints("llama")
    folder = _copy(src, tmp_path / "sharded")
    (folder / "model.safetensors").unlink()
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, folder / file)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}))
    a = compiler.compile(str(src), emit="gguf", output=tmp_path / "a", verify=False)
    b = compiler.compile(str(folder), emit="gguf", output=tmp_path / "b", verify=False)
    assert _gguf_tensors(a.path / "model.gguf") == _gguf_tensors(b.path / "model.gguf")


def test_shard_outside_the_folder_is_refused(tmp_path, checkpoints):
    folder = _copy(checkpoints("llama"), tmp_path / "evil")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../../etc/passwd"}}))
    with pytest.raises(ModelFormatError, match="outside the checkpoint folder"):
        import_source(folder)


def _corrupt(folder: Path, how: str) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    if how == "truncated":
        path.write_bytes(data[: len(data) - 1000])
    elif how == "header-length":
        path.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    elif how == "not-json":
        path.write_bytes(data[:8] + b"{" * n + data[8 + n:])
    elif how in ("offsets", "dtype", "shape"):
        name = next(k for k in header if k != "__metadata__")
        if how == "offsets":
            begin, end = header[name]["data_offsets"]
            header[name]["data_offsets"] = [begin + len(data), end + len(data)]  # right size, past the end
        elif how == "dtype":
            header[name]["dtype"] = "Q4"
        else:
            header[name]["shape"] = [d + 1 for d in header[name]["shape"]]
        raw = json.dumps(header).encode()  # offsets are relative to the data section, which is kept
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    elif how == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize("how,message", [
    ("truncated", "truncated"), ("header-length", "header length"), ("not-json", "not JSON"),
    ("offsets", "truncated"), ("dtype", "unknown dtype"), ("shape", "bytes for"), ("empty", "shorter than"),
])
def test_corrupt_safetensors_is_a_clear_error_and_leaves_nothing(how, message, tmp_path, checkpoints):
    folder = _copy(checkpoints("gpt2"), tmp_path / "broken")
    _corrupt(folder, how)
    out = tmp_path / "out"
    with pytest.raises(ModelFormatError, match=message) as err:
        compiler.compile(str(folder), emit="gguf", output=out)
    assert "model.safetensors" in str(err.value)
    assert not out.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_missing_tensor_is_reported(tmp_path, checkpoints):
    from safetensors.numpy import load_file, save_file

    folder = _copy(checkpoints("llama"), tmp_path / "partial")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelFormatError, match="blk.1.ffn_down.weight"):
        import_source(folder)


# --- architectures, schemes, emit formats -----------------------------------------------------

def test_unsupported_architecture_names_itself_and_the_supported_list(tmp_path, checkpoints):
    folder = _copy(checkpoints("llama"), tmp_path / "other")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedError, match="FalconForCausalLM") as err:
        compiler.compile(str(folder), emit="gguf", output=tmp_path / "out")
    assert "LlamaForCausalLM" in err.value.hint and "GPT2LMHeadModel" in err.value.hint


def test_cli_reports_one_line(tmp_path, checkpoints, capsys):
    from compiler.cli import main

    folder = _copy(checkpoints("gpt2"), tmp_path / "c")
    _corrupt(folder, "truncated")
    assert main(["compile", str(folder), "--emit", "gguf", "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kiln: error: ") and "corrupt safetensors" in err


def test_graph_schemes_do_not_apply_to_gguf(tmp_path, checkpoints):
    with pytest.raises(UnsupportedError, match="not a GGUF quantization") as err:
        compiler.compile(str(checkpoints("llama")), emit="gguf", quantize="w4", output=tmp_path / "o")
    assert "q4_k_m" in err.value.hint


def test_gguf_types_do_not_apply_to_onnx_graphs(tmp_path):
    with pytest.raises(KilnError, match="llama.cpp GGUF type"):
        compiler.compile("examples/models/tiny_cnn.onnx", quantize="q4_k_m", output=tmp_path / "o")


# --- GGUF files as input ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def f32_gguf(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-in")
    return compiler.compile(str(checkpoints("llama")), emit="gguf", quantize="f32", output=root / "f32",
                            verify=False).path / "model.gguf"


def test_gguf_input_requantizes_like_the_checkpoint(f32_gguf, checkpoints, tmp_path):
    a = compiler.compile(str(checkpoints("llama")), emit="gguf", quantize="q4_0", output=tmp_path / "a",
                         verify=False)
    b = compiler.compile(str(f32_gguf), emit="gguf", quantize="q4_0", output=tmp_path / "b")
    assert b.manifest["source"]["format"] == "gguf"
    assert b.manifest["verification"]["passed"]
    assert _gguf_tensors(a.path / "model.gguf") == _gguf_tensors(b.path / "model.gguf")
    assert Reader(b.path / "model.gguf").metadata["tokenizer.ggml.tokens"] == \
        Reader(f32_gguf).metadata["tokenizer.ggml.tokens"]


def test_gguf_input_without_quantize_copies_tensors(tmp_path, checkpoints):
    q = compiler.compile(str(checkpoints("llama")), emit="gguf", quantize="q8_0", output=tmp_path / "q",
                         verify=False).path / "model.gguf"
    copy = compiler.compile(str(q), emit="gguf", output=tmp_path / "copy", verify=False)
    assert _gguf_tensors(q) == _gguf_tensors(copy.path / "model.gguf")


@pytest.mark.parametrize("cut", [10, 100, 2000])
def test_truncated_gguf_is_a_clear_error(f32_gguf, tmp_path, cut):
    bad = tmp_path / "bad.gguf"
    data = f32_gguf.read_bytes()
    bad.write_bytes(data[:cut] if cut < 1000 else data[:-cut])
    with pytest.raises(ModelFormatError, match="not a valid GGUF file"):
        compiler.compile(str(bad), emit="gguf", output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dequantized_gguf_tensors_match_the_gguf_package(f32_gguf, tmp_path, checkpoints):
    import gguf

    q = compiler.compile(str(checkpoints("llama")), emit="gguf", quantize="q5_1", output=tmp_path / "q",
                         verify=False).path / "model.gguf"
    ck, _ = import_source(q)
    theirs = {t.name: t for t in gguf.GGUFReader(q).tensors}
    for t in ck.tensors:
        expected = gguf.quants.dequantize(theirs[t.name].data, theirs[t.name].tensor_type)
        np.testing.assert_array_equal(t.load(), np.asarray(expected, np.float32).reshape(t.shape))
