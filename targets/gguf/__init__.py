"""The GGUF backend: LLM checkpoints -> one ``model.gguf`` that llama.cpp runs.

Unlike the graph backends, it takes a Checkpoint (a Hugging Face folder or a GGUF
file, see ``compiler.importers``) rather than an ONNX graph: llama.cpp brings its
own graph for each architecture and needs only weights and metadata.
``emit_checkpoint`` chooses each tensor's type, quantizes and writes it;
``verify_checkpoint`` runs the file with llama.cpp and compares its logits with a
numpy forward pass of the same weights; ``load`` gives a runner for ``kiln run``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import KilnError, UnsupportedError, VerificationError
from compiler.importers.checkpoint import Checkpoint
from targets.backend import EmitResult
from targets.gguf import convert, mix
from targets.gguf.run import load

MODEL_FILE = "model.gguf"
REPORT_FILE = "quantization.json"
#: tokens of the verification run
VERIFY_TOKENS = 16
#: relative L2 error of the outputs allowed per weight precision. float32 weights compute in float32,
#: but llama.cpp approximates GELU (tanh form, fp16 table), which BERT's exact-erf GELU shows at ~2e-3;
#: F16/BF16 weights make llama.cpp round activations to 16 bits; quantized weights make it quantize
#: activations to 8 bits (Q8_0/Q8_K) for the dot products. A wrong layout or metadata gives O(1).
TOLERANCE = {"float32": 5e-3, "16-bit": 5e-2, "quantized": 0.25}

__all__ = ["legalize", "emit", "load", "emit_checkpoint", "verify_checkpoint"]

#: the driver passes --calibration to emit_checkpoint: text for an importance matrix (targets.gguf.calibrate)
checkpoint_calibration = True


def legalize(model: Any, spec: Any) -> list[str]:
    return ["--emit gguf converts LLM checkpoints (a Hugging Face folder with config.json, or a .gguf file), "
            "not ONNX graphs"]


def emit(model: Any, spec: Any, out_dir: Path, options: dict[str, Any] | None = None) -> EmitResult:
    raise UnsupportedError(legalize(model, spec)[0])


def file_type_of(scheme: Any) -> tuple[str | None, bool, str]:
    """(llama.cpp file type name or None to keep the stored types, pure, imatrix path) of a --quantize scheme."""
    if scheme is None:
        return None, False, ""
    name = getattr(scheme, "name", "")
    if name == "fp16":
        return "f16", False, ""
    if name == "bf16":
        return "bf16", False, ""
    if getattr(scheme, "gguf", False):
        return mix.canonical(name), bool(getattr(scheme, "pure", False)), str(getattr(scheme, "imatrix", "") or "")
    raise UnsupportedError(
        f"--quantize {scheme.spec()} is not a GGUF quantization",
        hint="--emit gguf takes llama.cpp file types: " + ", ".join(list(mix.FTYPES) + list(mix.ALIASES)))


def _imatrix(ck: Checkpoint, ftype: str | None, imatrix_path: str, calibration: Any, quiet: bool,
             say: Callable[[str], None]) -> tuple[dict[str, np.ndarray] | None, dict[str, Any] | None]:
    """(importance per tensor, its description for the report) from an imatrix file or calibration text."""
    shapes = {t.name: t.shape for t in ck.tensors}
    if calibration is not None:
        if imatrix_path:
            raise KilnError("give either --calibration (text to compute an importance matrix from) or "
                             "{imatrix=FILE} (llama.cpp's imatrix file), not both")
        if not isinstance(calibration, (str, os.PathLike)):
            raise KilnError("--calibration for --emit gguf is a text file (or a folder of .txt files)")
        if ftype is None or ftype in ("f32", "f16", "bf16", "q8_0"):
            raise KilnError(f"--calibration computes an importance matrix, which {ftype or 'a float GGUF'} "
                             "does not use", hint="use it with a 2- to 6-bit type such as q4_k_m")
        from targets.gguf.calibrate import imatrix_from_text
        from targets.gguf.imatrix import select

        values, info = imatrix_from_text(ck, calibration, quiet=quiet, log=say)
        return select(values, shapes, f"--calibration {calibration}"), {"calibration": str(calibration), **info}
    if imatrix_path:
        from targets.gguf.imatrix import load_imatrix

        return load_imatrix(imatrix_path, shapes), {"file": imatrix_path}
    return None, None


def emit_checkpoint(ck: Checkpoint, spec: Any, out_dir: Path, scheme: Any = None,
                    log: Callable[[str], None] | None = None, calibration: Any = None,
                    quiet: bool | None = None) -> tuple[EmitResult, dict[str, Any]]:
    """Write ``model.gguf`` (+ quantization.json when quantized). Returns the emit result and
    the manifest entries that describe it (signature, quantization). ``calibration``: text
    (a file or a folder of .txt) to compute the importance matrix from."""
    ftype, pure, imatrix_path = file_type_of(scheme)
    imatrix, imatrix_info = _imatrix(ck, ftype, imatrix_path, calibration, log is None if quiet is None else quiet,
                                     log or (lambda _m: None))
    plan = convert.plan(ck, ftype, pure, has_imatrix=imatrix is not None)
    say = log or (lambda _m: None)
    say(f"writing {len(plan.order)} tensors as {ftype or 'their stored types'}: {plan.counts()}")
    convert.write(ck, plan, out_dir / MODEL_FILE, imatrix)
    files = [MODEL_FILE]
    n_vocab, n_embd = ck.tensor("token_embd.weight").shape
    output = ({"name": "embeddings", "dtype": "float32", "shape": [1, "tokens", n_embd]} if ck.arch == "bert"
              else {"name": "logits", "dtype": "float32", "shape": [1, "tokens", n_vocab]})
    info: dict[str, Any] = {
        "signature": {"inputs": [{"name": "input_ids", "dtype": "int32", "shape": [1, "tokens"]}],
                      "outputs": [output]},
    }
    extra = {"architecture": ck.arch, "file_type": convert.file_type(ck, plan), "tensor_types": plan.counts()}
    if ck.warnings:
        extra["warnings"] = list(ck.warnings)
    if ftype is not None:
        n_params = sum(int(np.prod(t.shape)) for t in plan.order)
        out_bytes = (out_dir / MODEL_FILE).stat().st_size
        report = {
            "scheme": scheme.spec(), "llama_file_type": ftype, "pure": pure, "imatrix": imatrix_info,
            "bits_per_weight": round(8 * out_bytes / max(1, n_params), 3),
            "size_ratio": round(out_bytes / max(1, sum(t.nbytes_f32 for t in plan.order)), 4),
            "tensors": {t.name: plan.types[t.name] for t in plan.order},
        }
        (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
        files.append(REPORT_FILE)
        info["quantization"] = {"scheme": scheme.spec(), "report": REPORT_FILE, "size_ratio": report["size_ratio"],
                                "bits_per_weight": report["bits_per_weight"]}
    return EmitResult(files=files, entry=MODEL_FILE, extra=extra), info


def _precision(types: dict[str, int]) -> str:
    from targets.gguf.quants import TYPES

    if any(TYPES[t].quantized for t in types):
        return "quantized"
    return "16-bit" if any(t in ("F16", "BF16") for t in types) else "float32"


def verify_checkpoint(folder: Path, manifest: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Run the artifact with llama.cpp on seeded tokens and compare its logits with kiln's numpy
    forward pass over the artifact's own weights (read back from the file and dequantized)."""
    from compiler.importers.gguf_file import import_gguf
    from targets.gguf import reference, run

    why = run.available()
    if why:
        return {"skipped": why}
    written = import_gguf(folder / manifest["entry"])
    why = reference.supported(written)
    if why:
        return {"skipped": why}
    n_vocab = written.tensor("token_embd.weight").shape[0]
    n_ctx = int(written.get("{arch}.context_length", VERIFY_TOKENS))
    tokens = [int(t) for t in np.random.default_rng(seed).integers(0, n_vocab, min(VERIFY_TOKENS, n_ctx))]
    expected = reference.logits(written, tokens)
    runner = run.LlamaCppRunner(folder / manifest["entry"], n_ctx=max(32, len(tokens)),
                                embeddings=written.arch == "bert")
    actual = runner.hidden_states(tokens) if written.arch == "bert" else runner.logits(tokens)
    precision = _precision(manifest.get("backend", {}).get("tensor_types", {}))
    rel = float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))
    agree = float(np.mean(actual.argmax(-1) == expected.argmax(-1)))
    if not rel <= TOLERANCE[precision]:
        raise VerificationError(
            f"llama.cpp's logits differ from kiln's reference forward pass by {rel:.3g} (relative L2; "
            f"{precision} weights allow {TOLERANCE[precision]})",
            hint="the GGUF file's metadata or tensor layout does not match what llama.cpp expects")
    return {
        "method": "llama.cpp (llama-cpp-python) on the artifact vs kiln's numpy forward pass of its weights"
                  + (" (per-token hidden states)" if written.arch == "bert" else " (logits)"),
        "inputs": f"{len(tokens)} seeded random tokens (seed {seed})",
        "relative_l2": rel, "tolerance": TOLERANCE[precision],
        "max_abs_error": float(np.abs(actual - expected).max()),
        "argmax_agreement": agree,
        "passed": True,
    }
