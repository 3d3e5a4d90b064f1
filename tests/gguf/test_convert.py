"""Hugging Face checkpoint -> kiln GGUF -> llama.cpp: logits against transformers, tokenizers
against Hugging Face's, and the artifact as the driver describes it."""

from __future__ import annotations

import json

import numpy as np
import pytest

import compiler
from compiler.api import load_artifact
from targets.gguf.format import Reader
from tests.gguf import tiny

ARCHS = ["llama", "qwen2", "mistral", "gpt2"]


@pytest.fixture(scope="module")
def f32_artifacts(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("f32")
    return {arch: compiler.compile(str(checkpoints(arch)), emit="gguf", quantize="f32", output=root / arch)
            for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_logits_match_transformers(arch, checkpoints, f32_artifacts, llama_cpp):
    tokens = [int(t) for t in np.random.default_rng(1).integers(0, 300, 24)]
    expected = tiny.hf_logits(checkpoints(arch), tokens)
    llm = llama_cpp.Llama(model_path=str(f32_artifacts[arch].path / "model.gguf"), n_ctx=64, logits_all=True,
                          type_k=0, type_v=0, verbose=False, n_threads=2)
    llm.eval(tokens)
    actual = np.array(llm.scores[: len(tokens)])
    err = np.abs(actual - expected).max()
    assert err <= 1e-3, f"{arch}: max |llama.cpp - transformers| = {err:.3g}"


@pytest.mark.parametrize("arch", ARCHS)
def test_manifest_and_verification(arch, f32_artifacts):
    art = f32_artifacts[arch]
    m = art.manifest
    assert m["emit"] == "gguf" and m["entry"] == "model.gguf"
    assert m["source"]["format"] == "hf-safetensors" and len(m["source"]["sha256"]) == 64
    assert m["verification"]["passed"] is True
    assert m["verification"]["relative_l2"] <= m["verification"]["tolerance"]
    assert m["backend"]["architecture"] == ("llama" if arch == "mistral" else arch)
    assert m["backend"]["tensor_types"] == {"F32": sum(1 for _ in Reader(art.path / "model.gguf").tensors)}
    art.check()  # file hashes


def test_kiln_run_gives_llama_cpp_logits(f32_artifacts):
    art = load_artifact(f32_artifacts["qwen2"].path)
    out = art.run({"input_ids": np.array([[1, 2, 3, 4]], np.int32)})
    assert out["logits"].shape == (1, 4, art.outputs[0]["shape"][2])
    assert np.isfinite(out["logits"]).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_metadata_llama_cpp_reads(arch, checkpoints, f32_artifacts):
    reader = Reader(f32_artifacts[arch].path / "model.gguf")
    config = json.loads((checkpoints(arch) / "config.json").read_text())
    a = "llama" if arch == "mistral" else arch
    assert reader.get("general.architecture") == a
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    assert reader.get(f"{a}.block_count") == layers
    assert reader.get("tokenizer.ggml.model") == "gpt2"
    assert reader.get("tokenizer.ggml.eos_token_id") == config["eos_token_id"]
    assert "tokenizer.chat_template" in reader.metadata
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and f"blk.{layers - 1}.ffn_down.weight" in names
    tied = arch in ("qwen2", "gpt2")
    assert ("output.weight" in names) is not tied


@pytest.mark.parametrize("arch,pre", [("llama", "llama-bpe"), ("qwen2", "qwen2"), ("gpt2", "gpt-2"),
                                      ("mistral", "gpt-2")])
def test_tokenizer_round_trip(arch, pre, checkpoints, f32_artifacts, llama_cpp):
    """llama.cpp tokenizes a few hundred strings exactly as Hugging Face does."""
    from tokenizers import Tokenizer

    path = f32_artifacts[arch].path / "model.gguf"
    assert Reader(path).get("tokenizer.ggml.pre") == pre
    hf = Tokenizer.from_file(str(checkpoints(arch) / "tokenizer.json"))
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    strings = tiny.probe_strings(300)
    mismatched = [s for s in strings
                  if hf.encode(s, add_special_tokens=False).ids != llm.tokenize(s.encode(), add_bos=False, special=False)]
    assert not mismatched, f"{len(mismatched)} of {len(strings)} differ, e.g. {mismatched[0]!r}"
    for s in strings[:50]:  # and back
        assert llm.detokenize(llm.tokenize(s.encode(), add_bos=False, special=False)).decode() == s


def test_smollm_pre_tokenizer_round_trip(tmp_path, llama_cpp):
    """Digits split one by one before byte-level BPE (SmolLM) -> llama.cpp's smollm pre-tokenizer."""
    from tokenizers import Tokenizer

    tiny.byte_level_tokenizer(tmp_path, 320, pre="smollm")
    import transformers

    cfg = tiny.llama_config(Tokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab_size())
    tiny.save_model(transformers.LlamaForCausalLM(cfg), tmp_path)
    art = compiler.compile(str(tmp_path), emit="gguf", output=tmp_path / "out", verify=False)
    path = art.path / "model.gguf"
    assert Reader(path).get("tokenizer.ggml.pre") == "smollm"
    hf = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for s in tiny.probe_strings(200, seed=3):
        assert hf.encode(s, add_special_tokens=False).ids == llm.tokenize(s.encode(), add_bos=False, special=False), s


def test_sentencepiece_style_tokenizer(tmp_path, llama_cpp):
    """LLaMA-2 / Mistral style tokenizer.json (byte fallback, "▁" spaces) -> llama.cpp's SPM tokenizer."""
    import transformers
    from tokenizers import Tokenizer

    info = tiny.sentencepiece_style_tokenizer(tmp_path)
    tiny.save_model(transformers.LlamaForCausalLM(tiny.llama_config(info["size"], bos_token_id=1, eos_token_id=2)),
                    tmp_path)
    art = compiler.compile(str(tmp_path), emit="gguf", output=tmp_path / "out")
    assert art.manifest["verification"]["passed"]
    reader = Reader(art.path / "model.gguf")
    assert reader.get("tokenizer.ggml.model") == "llama"
    assert reader.get("tokenizer.ggml.add_bos_token") is True
    assert reader.get("tokenizer.ggml.bos_token_id") == 1 and reader.get("tokenizer.ggml.eos_token_id") == 2
    tokens, types = reader.get("tokenizer.ggml.tokens"), reader.get("tokenizer.ggml.token_type")
    assert types[tokens.index("<0x41>")] == 6 and types[tokens.index("<s>")] == 3  # BYTE, CONTROL
    hf = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    llm = llama_cpp.Llama(model_path=str(art.path / "model.gguf"), vocab_only=True, verbose=False)
    strings = tiny.probe_strings(300, seed=1)
    mismatched = [s for s in strings
                  if hf.encode(s, add_special_tokens=False).ids != llm.tokenize(s.encode(), add_bos=False, special=False)]
    assert not mismatched, f"{len(mismatched)} of {len(strings)} differ, e.g. {mismatched[0]!r}"
    assert llm.tokenize(b"Hello", add_bos=True)[0] == 1


def test_inspect_describes_a_gguf_artifact(f32_artifacts):
    from compiler.inspect_model import format_summary, inspect_path

    info, title = inspect_path(f32_artifacts["llama"].path)
    text = format_summary(info, title)
    assert "emit=gguf" in text and "model.gguf" in text
    assert "input_ids" in text  # the signature from the manifest
