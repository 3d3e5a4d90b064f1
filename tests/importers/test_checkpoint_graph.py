"""LLM checkpoints compiled through the IR graph (``kiln compile CKPT --emit onnx|tvm``): tiny LLaMA,
Qwen2, Mistral, GPT-2 and BERT models from transformers configs with random weights, saved as
safetensors; the artifacts' outputs against transformers' on batches of two with right padding."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import compiler
from compiler.cli import main
from compiler.errors import UnsupportedError
from tests.gguf import tiny

#: (sequence lengths, padding of the second row) used for every comparison
SHAPES = ((5, 0), (11, 3))
ATOL = 1e-4

VARIANTS = {
    "llama": lambda d: tiny.make_llama(d, "llama"),  # GQA 4/2, separate LM head
    "qwen2": lambda d: tiny.make_llama(d, "qwen2"),  # q/k/v biases, tied embeddings
    "mistral": lambda d: tiny.make_llama(d, "mistral", sliding_window=4),  # the window matters at length 11
    "gpt2": lambda d: tiny.make_gpt2(d),
    # llama3 rope scaling (short original context so the factors differ from 1), tied, rope theta 5e5
    "llama3-rope": lambda d: tiny.make_llama(d, "llama", seed=1, tie_word_embeddings=True, rope_theta=5e5,
                                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                           "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 16}),
    "qwen2-linear-rope": lambda d: tiny.make_llama(d, "qwen2", seed=2,
                                                   rope_scaling={"rope_type": "linear", "factor": 3.0}),
    "bert": lambda d: _make_bert(d),
}


def _make_bert(folder: Path) -> Path:
    import transformers

    cfg = transformers.BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64, type_vocab_size=2)
    tiny.save_model(transformers.BertModel(cfg), folder, seed=3)
    return folder


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt-graph")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = VARIANTS[name](root / name)
        return built[name]

    return get


def _feeds(seq: int, pad: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(2, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    if pad:
        mask[1, -pad:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@functools.lru_cache(maxsize=None)
def _hf_model(folder: Path):
    import torch
    import transformers

    config = json.loads((folder / "config.json").read_text())
    encoder = config["architectures"][0] == "BertModel"
    cls = transformers.AutoModel if encoder else transformers.AutoModelForCausalLM
    return cls.from_pretrained(str(folder), dtype=torch.float32).eval(), encoder


def _transformers(folder: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    model, encoder = _hf_model(folder)
    args = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        out = model(**args)
    return (out.last_hidden_state if encoder else out.logits).numpy()


def _check_against_transformers(art, folder: Path, vocab: int, atol: float = ATOL) -> None:
    for i, (seq, pad) in enumerate(SHAPES):
        feeds = _feeds(seq, pad, vocab, seed=i)
        expected = _transformers(folder, feeds)
        (actual,) = art.run(feeds).values()
        assert actual.shape == expected.shape
        err = float(np.abs(actual - expected).max())
        assert err <= atol, f"seq {seq}: max abs error {err}"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_onnx_matches_transformers(name, checkpoint, tmp_path):
    folder = checkpoint(name)
    art = compiler.compile(str(folder), emit="onnx", opt_level=2, output=tmp_path / "out")
    manifest = art.manifest
    assert manifest["source"]["format"] == "hf-safetensors"
    assert manifest["verification"]["passed"]
    assert [i["name"] for i in manifest["signature"]["inputs"]] == ["input_ids", "attention_mask"]
    assert manifest["signature"]["outputs"][0]["name"] == ("last_hidden_state" if name == "bert" else "logits")
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    _check_against_transformers(art, folder, vocab)


def test_o2_fuses_norms_and_attention_for_onnx(checkpoint, tmp_path):
    """At -O2 the decomposed RMSNorm and attention become the standard opset-23 ops onnxruntime runs."""
    assert main(["compile", str(checkpoint("llama")), "--emit", "onnx", "-O2", "-o", str(tmp_path / "o")]) == 0
    ops = [n.op_type for n in onnx.load(str(tmp_path / "o" / "model.onnx")).graph.node]
    assert ops.count("RMSNormalization") == 2 * 2 + 1 and ops.count("Attention") == 2
    assert "Softmax" not in ops


def test_metadata_records_source_architecture_and_tokenizer(checkpoint, tmp_path):
    from compiler.ir.metadata import KEY

    folder = checkpoint("qwen2")
    art = compiler.compile(str(folder), emit="onnx", output=tmp_path / "o", verify=False)
    props = {p.key: p.value for p in onnx.load(str(art.path / "model.onnx")).metadata_props}
    meta = json.loads(props[KEY])
    config = json.loads((folder / "config.json").read_text())
    assert meta["source_format"] == "hf-safetensors"
    assert meta["source_sha256"] == art.manifest["source"]["sha256"]
    arch = meta["architecture"]
    assert arch["name"] == "qwen2" and arch["hf"] == "Qwen2ForCausalLM"
    for key in ("num_attention_heads", "num_key_value_heads", "num_hidden_layers", "hidden_size",
                "intermediate_size", "vocab_size", "tie_word_embeddings"):
        assert arch[key] == config[key], key
    assert arch["rms_norm_eps"] == pytest.approx(config["rms_norm_eps"])
    assert arch["rope_theta"] == pytest.approx(config["rope_parameters"]["rope_theta"])
    tok = json.loads((folder / "tokenizer.json").read_text())
    tokens = meta["tokenizer"]["tokenizer.ggml.tokens"]
    assert len(tokens) == config["vocab_size"]
    assert all(tokens[i] == t for t, i in tok["model"]["vocab"].items())


def test_tvm_matches_transformers(checkpoint, tmp_path):
    folder = checkpoint("llama")
    art = compiler.compile(str(folder), emit="tvm", opt_level=2, output=tmp_path / "tvm")
    assert art.manifest["verification"]["passed"]
    assert (art.path / "lib.so").is_file()
    _check_against_transformers(art, folder, json.loads((folder / "config.json").read_text())["vocab_size"])


def test_w4_checkpoint_to_onnx(checkpoint, tmp_path):
    folder = checkpoint("llama")
    float_art = compiler.compile(str(folder), emit="onnx", opt_level=2, output=tmp_path / "f", verify=False)
    art = compiler.compile(str(folder), emit="onnx", opt_level=2, quantize="w4", output=tmp_path / "q")
    assert art.manifest["verification"]["passed"]
    assert art.manifest["quantization"]["scheme"].startswith("w4")
    size = sum(f.stat().st_size for f in art.path.glob("model.onnx*"))
    float_size = sum(f.stat().st_size for f in float_art.path.glob("model.onnx*"))
    assert size < 0.4 * float_size
    feeds = _feeds(11, 3, json.loads((folder / "config.json").read_text())["vocab_size"], seed=5)
    expected = _transformers(folder, feeds).ravel()
    (actual,) = art.run(feeds).values()
    cosine = float(actual.ravel() @ expected / np.linalg.norm(actual) / np.linalg.norm(expected))
    assert 0.9 < cosine < 0.99999  # quantized: close to the float model, not equal to it


def test_gguf_file_compiles_to_onnx(checkpoint, tmp_path):
    """A GGUF file (LLaMA q/k rows in llama.cpp's interleaved layout) gives the same logits."""
    folder = checkpoint("llama")
    gguf = compiler.compile(str(folder), emit="gguf", quantize="f32", output=tmp_path / "g", verify=False)
    art = compiler.compile(str(gguf.path / "model.gguf"), emit="onnx", opt_level=2, output=tmp_path / "o")
    assert art.manifest["source"]["format"] == "gguf"
    assert art.manifest["verification"]["passed"]
    _check_against_transformers(art, folder, json.loads((folder / "config.json").read_text())["vocab_size"])


def test_unsupported_architecture_names_the_supported_list(checkpoint, tmp_path):
    folder = tmp_path / "falcon"
    folder.mkdir()
    src = checkpoint("llama")
    for f in src.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["FalconForCausalLM"]}))
    with pytest.raises(UnsupportedError, match="FalconForCausalLM is not supported") as err:
        compiler.compile(str(folder), emit="onnx", output=tmp_path / "o")
    assert "LlamaForCausalLM" in err.value.hint and "GPT2LMHeadModel" in err.value.hint
    assert not (tmp_path / "o").exists()


def test_unsupported_rope_scaling_is_a_clear_error(checkpoint, tmp_path):
    folder = tmp_path / "yarn"
    folder.mkdir()
    src = checkpoint("qwen2")
    for f in src.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0}
    config["rope_parameters"] = config["rope_scaling"] = yarn
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedError, match="rope scaling 'yarn' has no graph form"):
        compiler.compile(str(folder), emit="onnx", output=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_pruned_heads_update_the_architecture_metadata(checkpoint, tmp_path):
    """The checkpoint graph is a graph like any other: --prune follows its heads through the GQA repeat
    (at -O1; -O2 at opset 23 fuses Attention, which the pruning analysis does not read yet)."""
    from compiler.ir.metadata import KEY

    folder = checkpoint("llama")
    art = compiler.compile(str(folder), emit="onnx", opt_level=1, prune="heads=0.5", output=tmp_path / "o")
    assert art.manifest["verification"]["passed"]
    assert art.manifest["pruning"]["params_after"] < art.manifest["pruning"]["params_before"]
    props = {p.key: p.value for p in onnx.load(str(art.path / "model.onnx")).metadata_props}
    arch = json.loads(props[KEY])["architecture"]
    config = json.loads((folder / "config.json").read_text())
    assert arch["pruned"] is True
    assert (arch["num_attention_heads"], arch["num_key_value_heads"]) == (
        config["num_attention_heads"] // 2, config["num_key_value_heads"] // 2)
    feeds = _feeds(11, 3, config["vocab_size"], seed=7)
    (logits,) = art.run(feeds).values()
    assert logits.shape == (2, 11, config["vocab_size"]) and np.isfinite(logits).all()
