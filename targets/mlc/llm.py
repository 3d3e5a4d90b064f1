"""LLM checkpoints -> an MLC package: ``lib.so`` + weight shards + ``mlc-chat-config.json`` + tokenizer.

``emit_checkpoint`` builds the LLaMA-family module for the quantization mode
(``llama``), compiles it with the weights as parameters (``library``), streams
the weights into the tensor cache (``weights``, ``tensor_cache``) and writes
the chat config and tokenizer (``package``). ``verify_checkpoint`` runs the
package's prefill on seeded tokens and compares its logits with a numpy
forward pass over the package's own weights (``reference``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import VerificationError
from compiler.importers.checkpoint import Checkpoint
from targets.backend import EmitResult
from targets.mlc import host, library, llama, package, tensor_cache, weights
from targets.mlc.modes import MODES, mode_of

#: tokens of the verification run
VERIFY_TOKENS = 16
#: relative L2 error of the logits allowed against the numpy forward pass of the package's weights:
#: float32 models differ by summation order only; float16 models round every activation to 16 bits
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}


def emit_checkpoint(ck: Checkpoint, spec: Any, out_dir: Path, scheme: Any = None,
                    log: Callable[[str], None] | None = None) -> tuple[EmitResult, dict[str, Any]]:
    say = log or (lambda _m: None)
    mode = mode_of(scheme)
    config = weights.config_of(ck)
    module, functions = llama.build(config, mode)
    mod, named = module.export_tvm(functions)
    names = [n for n, _ in named]
    say(f"compiling {ck.arch} ({config.num_hidden_layers} layers, {mode.name}) for {spec.name}")
    linked, timings = library.build(mod, spec, out_dir, llm=True)
    start = time.perf_counter()
    say(f"writing {len(names)} parameters as {mode.name}")
    cache_files = tensor_cache.write(weights.parameters(ck, config, mode, names), out_dir,
                                     metadata={"quantization": mode.name, "model_type": ck.arch})
    timings["weights"] = time.perf_counter() - start
    tokenizer = package.copy_tokenizer(ck, out_dir)
    chat = package.write_chat_config(out_dir, package.chat_config(ck, config, mode, tokenizer, names))
    files = [linked.file, *cache_files, chat, *tokenizer]
    extra: dict[str, Any] = {
        "kind": "llm",
        "architecture": ck.arch,
        "quantization": mode.name,
        "library": linked.file,
        "linker": linked.linker,
        "functions": ["prefill", "decode", "_initialize_effect"],
        "shards": len(cache_files) - 1,
    }
    if ck.warnings:
        extra["warnings"] = list(ck.warnings)
    if linked.note:
        extra["notes"] = [linked.note]
    emit_checkpoint.last_timings = timings  # type: ignore[attr-defined]  # for bench/mlc.py; never in files
    info: dict[str, Any] = {
        "signature": {
            "inputs": [{"name": "input_ids", "dtype": "int32", "shape": [1, "tokens"]}],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, "tokens", config.vocab_size]}],
        },
    }
    if mode.quantized or mode.model_dtype != "float32":
        n_float = sum(t.nbytes_f32 for t in ck.tensors if t.name != "rope_freqs.weight")
        n_bytes = sum(r.nbytes for r in tensor_cache.read_index(out_dir).records)
        info["quantization"] = {"scheme": mode.name, "size_ratio": round(n_bytes / max(1, n_float), 4)}
    return EmitResult(files=files, entry=linked.file, extra=extra), info


def verify_checkpoint(folder: Path, manifest: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    from targets.mlc import reference
    from targets.mlc.loader import LlmRunner

    why = host.problem(manifest)
    if why:
        return {"skipped": why}
    runner = LlmRunner(folder, manifest)
    mode = MODES[runner.config["quantization"]]
    cfg = runner.config["model_config"]
    n = min(VERIFY_TOKENS, runner.context)
    tokens = [int(t) for t in np.random.default_rng(seed).integers(0, runner.vocab_size, n)]
    actual = runner.run({"input_ids": np.asarray([tokens], np.int32)})["logits"][0]
    expected = reference.logits(runner.weights.arrays, cfg, mode, tokens)
    rel = float(np.linalg.norm(actual - expected) / max(float(np.linalg.norm(expected)), 1e-30))
    tolerance = TOLERANCE[mode.model_dtype]
    if not rel <= tolerance:
        raise VerificationError(
            f"the package's logits differ from a numpy forward pass of its weights by {rel:.3g} "
            f"(relative L2; {mode.model_dtype} allows {tolerance})",
            hint="the compiled library does not compute what the packaged weights mean")
    return {
        "method": "the package (prefill) vs kiln's numpy forward pass of the package's weights",
        "inputs": f"{n} seeded random tokens (seed {seed})",
        "relative_l2": rel, "tolerance": tolerance,
        "max_abs_error": float(np.abs(actual - expected).max()),
        "argmax_agreement": float(np.mean(actual.argmax(-1) == expected.argmax(-1))),
        "passed": True,
    }
