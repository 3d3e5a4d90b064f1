"""LLM packages: a tiny random-weight LLaMA packaged q0f32 and q4f16_1, against transformers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from compiler import cli
from compiler.api import load_artifact
from compiler.errors import ArtifactError
from targets.mlc import generate, group_quant, loader
from targets.mlc.modes import MODES
from tests.targets.mlc.conftest import hf_greedy, hf_logits

PROMPT = "The quick brown fox jumps over the lazy dog."
STEPS = 32


def _runner(art) -> loader.LlmRunner:
    """A runner opened from the files on disk."""
    runner = loader.load(art.path, load_artifact(art.path).manifest)
    assert isinstance(runner, loader.LlmRunner)
    return runner


def _prompt(runner) -> list[int]:
    return generate.encode(runner, generate.tokenizer(runner.folder), PROMPT)


def test_package_layout(llm_package):
    art = llm_package("q4f16_1")
    files = {f["path"] for f in art.manifest["files"]}
    assert {"lib.so", "tensor-cache.json", "params_shard_0.bin", "mlc-chat-config.json", "tokenizer.json",
            "tokenizer_config.json"} <= files
    chat = json.loads((art.path / "mlc-chat-config.json").read_text())
    assert chat["quantization"] == "q4f16_1" and chat["model_type"] == "llama"
    assert chat["quantization_config"]["group_size"] == 32 and chat["quantization_config"]["storage_dtype"] == "uint32"
    records = {r["name"]: r for s in json.loads((art.path / "tensor-cache.json").read_text())["records"]
               for r in s["records"]}
    k, n = 64, (4 + 2 * 2) * 16  # hidden 64; q + k + v heads of 16
    assert records["model.layers.0.self_attn.qkv_proj.q_weight"]["shape"] == [n, k // 8]
    assert records["model.layers.0.self_attn.qkv_proj.q_weight"]["dtype"] == "uint32"
    assert records["model.layers.0.self_attn.qkv_proj.q_scale"]["shape"] == [n, k // 32]
    assert records["model.layers.0.self_attn.qkv_proj.q_scale"]["dtype"] == "float16"
    assert records["model.layers.0.input_layernorm.weight"]["dtype"] == "float16"
    assert art.manifest["verification"]["passed"]
    assert art.manifest["quantization"]["size_ratio"] < 0.2


def test_q0f32_generates_what_transformers_generates(llm_package, llama_checkpoint):
    runner = _runner(llm_package("q0f32"))
    prompt = _prompt(runner)
    ours = runner.generate(prompt, STEPS)
    theirs, their_logits = hf_greedy(llama_checkpoint, prompt, STEPS)
    assert ours.tokens == theirs
    np.testing.assert_allclose(ours.logits, their_logits, rtol=0, atol=1e-5)


def test_q4f16_1_logits_stay_close_to_transformers(llm_package, llama_checkpoint, record_property):
    """The package's q4f16_1 logits, teacher-forced on its own greedy tokens: within float16 rounding of
    transformers running the same (decoded) weights, and within quantization error of the float model."""
    mode = MODES["q4f16_1"]
    runner = _runner(llm_package("q4f16_1"))
    prompt = _prompt(runner)
    ours = runner.generate(prompt, STEPS)
    assert len(ours.tokens) == STEPS
    rows = slice(len(prompt) - 1, len(prompt) - 1 + STEPS)
    same_weights = hf_logits(llama_checkpoint, prompt + ours.tokens,
                             lambda w: group_quant.decode(*group_quant.encode(w, mode), w.shape[1], mode))[rows]
    rel = np.linalg.norm(ours.logits - same_weights) / np.linalg.norm(same_weights)
    assert rel < 5e-3
    assert np.array_equal(ours.logits.argmax(-1), same_weights.argmax(-1))
    float_model = hf_logits(llama_checkpoint, prompt + ours.tokens)[rows]
    max_diff = float(np.abs(ours.logits - float_model).max())
    rel_float = float(np.linalg.norm(ours.logits - float_model) / np.linalg.norm(float_model))
    agreement = float(np.mean(ours.logits.argmax(-1) == float_model.argmax(-1)))
    record_property("q4f16_1_vs_transformers", {"max_abs_diff": max_diff, "relative_l2": rel_float,
                                                "token_agreement": agreement})
    print(f"\nq4f16_1 vs transformers float32: max |logit diff| {max_diff:.4f} "
          f"(logits up to {np.abs(float_model).max():.3f}), relative L2 {rel_float:.4f}, "
          f"argmax agreement {agreement:.3f} over {STEPS} teacher-forced steps")
    assert rel_float < 0.3  # int4 weight noise on a random 64-wide model; measured 0.16
    assert agreement >= 0.6  # measured 0.84


def test_kiln_generate(llm_package, llama_checkpoint, capsys):
    art = llm_package("q0f32")
    assert cli.main(["generate", str(art.path), "--prompt", PROMPT, "--max-tokens", str(STEPS), "--ignore-eos"]) == 0
    out, err = capsys.readouterr()
    runner = _runner(art)
    tok = generate.tokenizer(runner.folder)
    theirs, _ = hf_greedy(llama_checkpoint, _prompt(runner), STEPS)
    assert out == tok.decode(theirs, skip_special_tokens=True) + "\n"
    assert f"{STEPS} generated" in err and "tokens/s" in err


def test_kiln_run_gives_prefill_logits(llm_package, llama_checkpoint, tmp_path):
    art = llm_package("q0f32")
    tokens = [3, 141, 59, 26, 5, 35]
    np.savez(tmp_path / "in.npz", input_ids=np.asarray([tokens], np.int32))
    assert cli.main(["run", str(art.path), "-i", str(tmp_path / "in.npz"), "-o", str(tmp_path / "out.npz")]) == 0
    logits = np.load(tmp_path / "out.npz")["logits"]
    np.testing.assert_allclose(logits[0], hf_logits(llama_checkpoint, tokens), rtol=0, atol=1e-5)


def test_decode_continues_the_cache(llm_package):
    """prefill(a) then decode(b) computes what prefill(a + b) computes; reset starts over."""
    runner = _runner(llm_package("q0f32"))
    tokens = [7, 8, 9, 10, 11]
    whole = runner.run({"input_ids": np.asarray([tokens], np.int32)})["logits"][0]
    runner.reset()
    runner.prefill(tokens[:3])
    steps = [runner.decode(t) for t in tokens[3:]]
    np.testing.assert_allclose(np.stack(steps), whole[3:], rtol=0, atol=1e-5)


def test_corrupt_shard_in_an_llm_package(llm_package, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(llm_package("q4f16_1").path, pkg)
    shard = pkg / "params_shard_0.bin"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x80
    shard.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="md5 .* does not match"):
        loader.LlmRunner(pkg, load_artifact(pkg).manifest)


def test_generate_refuses_a_graph_package(cnn_package, capsys):
    assert cli.main(["generate", str(cnn_package.path), "--prompt", "hi"]) == 1
    assert "kiln generate runs LLM packages" in capsys.readouterr().err
