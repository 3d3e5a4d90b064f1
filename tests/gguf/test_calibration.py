"""Importance matrices computed from calibration text by kiln's numpy forward pass
(``--emit gguf --quantize ... --calibration texts.txt``)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import compiler
from compiler.errors import KilnError
from compiler.importers import import_source
from targets.gguf import calibrate
from targets.gguf import quants as Q
from tests.gguf import tiny
from tests.gguf.test_llama_quantize import _llama_quantize, _tensors

#: llama.cpp tensor name of each nn.Linear in a transformers LLaMA block
_HF_TO_LLAMA_CPP = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "texts.txt"
    path.write_text("\n".join(tiny.probe_strings(40, seed=5)) + "\n" + "".join(tiny.CORPUS[:7]), encoding="utf-8")
    return path


def _torch_imatrix(folder, chunks):
    """Mean of squared inputs per column of every nn.Linear of the decoder blocks, from forward hooks."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    sums, counts, hooks = {}, {}, []
    for name, module in model.model.layers.named_modules():
        m = re.fullmatch(r"(\d+)\.(.+)", name)
        if isinstance(module, torch.nn.Linear) and m and m.group(2) in _HF_TO_LLAMA_CPP:
            key = f"blk.{m.group(1)}.{_HF_TO_LLAMA_CPP[m.group(2)]}.weight"

            def hook(_mod, args, key=key):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[key] = sums.get(key, 0) + (x * x).sum(0).numpy()
                counts[key] = counts.get(key, 0) + x.shape[0]

            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for chunk in chunks:
            model(torch.tensor([chunk]))
    for h in hooks:
        h.remove()
    return {k: sums[k] / counts[k] for k in sums}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_imatrix_equals_torch_forward_hooks(arch, checkpoints, text_file):
    import transformers

    folder = checkpoints(arch)
    ck = import_source(str(folder))[0]
    text = text_file.read_text(encoding="utf-8")
    tokens = calibrate.tokenize(ck, text)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    assert tokens == hf(text, add_special_tokens=False)["input_ids"]
    ours, info = calibrate.imatrix_from_text(ck, text_file, quiet=True)
    ctx = info["ctx"]
    assert ctx == 128  # the tiny models' context, shorter than llama-imatrix's 512
    chunks = calibrate.chunks(ck, tokens, ctx)
    assert len(chunks) >= 3 and info["tokens"] == sum(len(c) for c in chunks)
    theirs = _torch_imatrix(folder, chunks)
    assert ours.keys() == theirs.keys() and len(ours) == 7 * 2
    for name, expected in theirs.items():
        assert ours[name].dtype == np.float32 and ours[name].shape == expected.shape
        np.testing.assert_allclose(ours[name], expected, rtol=2e-4, err_msg=name)


def test_chunks_follow_llama_imatrix(checkpoints):
    """BOS replaces each chunk's first token when the tokenizer adds one; under 16 tokens is not a batch."""
    ck = import_source(str(checkpoints("llama")))[0]
    tokens = list(range(1, 300))
    parts = calibrate.chunks(ck, tokens, 128)
    assert [len(p) for p in parts] == [128, 128, 43] and parts[1][0] == 129
    assert [len(p) for p in calibrate.chunks(ck, tokens[:140], 128)] == [128]  # 12 left over: dropped
    from targets.gguf import format as gguf

    ck.metadata["tokenizer.ggml.add_bos_token"] = gguf.boolean(True)
    bos = ck.get("tokenizer.ggml.bos_token_id")
    with_bos = calibrate.chunks(ck, tokens, 128)
    assert [p[0] for p in with_bos] == [bos] * 3 and [p[1:] for p in with_bos] == [p[1:] for p in parts]


def _weighted_error(w, q, imatrix):
    return float((imatrix[None, :] * (w - q) ** 2).sum())


def test_quantizing_with_it_reduces_the_weighted_error(wide_checkpoints, text_file):
    """What an importance matrix is for: K-quants with it make a smaller error weighted by the
    activations' energy (what the layer's output error is, to second order) than without."""
    ck = import_source(str(wide_checkpoints("llama")))[0]
    imatrix, _ = calibrate.imatrix_from_text(ck, text_file, quiet=True)
    names = [n for n in imatrix if n.startswith(("blk.0.", "blk.3.", "blk.7."))
             and n.endswith(("attn_q.weight", "attn_output.weight", "ffn_down.weight", "ffn_up.weight"))]
    assert len(names) == 12
    for type_name in ("Q2_K", "Q4_K"):
        better = 0
        total_with = total_without = 0.0
        for name in names:
            w = ck.tensor(name).load()
            shape = w.shape
            plain = Q.dequantize(Q.quantize(w, type_name), type_name, shape)
            weighted = Q.dequantize(Q.quantize(w, type_name, imatrix[name]), type_name, shape)
            e_with, e_without = (_weighted_error(w, weighted, imatrix[name]),
                                 _weighted_error(w, plain, imatrix[name]))
            better += e_with < e_without
            total_with += e_with
            total_without += e_without
        assert total_with < 0.97 * total_without, (type_name, total_with, total_without)
        assert better >= 0.8 * len(names), (type_name, better, len(names))


def test_compile_with_calibration_equals_llama_quantize_with_that_imatrix(wide_checkpoints, text_file, llama_cpp,
                                                                         tmp_path):
    """--calibration feeds the quantizers exactly as an imatrix file does: the tensors equal
    llama.cpp's llama_model_quantize of kiln's F32 file given the same importance values."""
    folder = wide_checkpoints("llama")
    art = compiler.compile(str(folder), emit="gguf", quantize="q4_k_m", calibration=str(text_file),
                           output=tmp_path / "kiln")
    assert art.manifest["verification"]["passed"]
    report = art.quantization
    assert report["imatrix"]["calibration"] == str(text_file) and report["imatrix"]["tokens"] > 512
    f32 = compiler.compile(str(folder), emit="gguf", quantize="f32", output=tmp_path / "f32", verify=False)
    imatrix, _ = calibrate.imatrix_from_text(import_source(str(folder))[0], text_file, quiet=True)
    _llama_quantize(llama_cpp, f32.path / "model.gguf", tmp_path / "llama.gguf", "q4_k_m", imatrix=imatrix)
    ours, theirs = _tensors(art.path / "model.gguf"), _tensors(tmp_path / "llama.gguf")
    assert ours.keys() == theirs.keys()
    assert [n for n in theirs if ours[n] != theirs[n]] == []


@pytest.mark.parametrize("quantize,calibration,message", [
    ("q4_k_m{imatrix=x.dat}", "TEXT", "not both"),
    ("q8_0", "TEXT", "does not use"),
    ("q4_k_m", "MISSING", "no such file"),
    ("q4_k_m", "EMPTY", "fewer than the 16"),
])
def test_bad_calibration_is_one_clear_error(quantize, calibration, message, checkpoints, text_file, tmp_path):
    paths = {"TEXT": text_file, "MISSING": tmp_path / "missing.txt", "EMPTY": tmp_path / "empty.txt"}
    paths["EMPTY"].write_text("hi", encoding="utf-8")
    with pytest.raises(KilnError, match=message):
        compiler.compile(str(checkpoints("llama")), emit="gguf", quantize=quantize,
                         calibration=str(paths[calibration]), output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_gguf_source_gives_the_same_importance(checkpoints, text_file, tmp_path):
    """From a GGUF file the text is tokenized by llama.cpp's vocabulary and the forward pass reads
    the file's weights: the same importance as from the Hugging Face folder it came from."""
    folder = checkpoints("llama")
    f32 = compiler.compile(str(folder), emit="gguf", quantize="f32", output=tmp_path / "f32", verify=False)
    from_hf, info_hf = calibrate.imatrix_from_text(import_source(str(folder))[0], text_file, quiet=True)
    from_gguf, info_gguf = calibrate.imatrix_from_text(import_source(str(f32.path / "model.gguf"))[0], text_file,
                                                       quiet=True)
    assert info_hf == info_gguf and from_hf.keys() == from_gguf.keys()
    for name in from_hf:
        np.testing.assert_allclose(from_gguf[name], from_hf[name], rtol=1e-5, err_msg=name)
