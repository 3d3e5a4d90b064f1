"""The MLC backend: ``--emit mlc`` writes an MLC-LLM-style package.

A package is a compiled library plus separately loaded weights, so one
library serves many weight sets and weights stream in without a copy::

    lib.so                    the compiled functions (lib.tar of objects when no linker is here)
    tensor-cache.json         per shard: dataPath, nbytes, md5sum; per tensor: name, shape, dtype,
    params_shard_N.bin        format, byteOffset, nbytes (~32 MB shards; tvm.contrib.tvmjs reads them)
    mlc-chat-config.json      LLM packages: model config, quantization, token ids, function names
    tokenizer.json ...        LLM packages: the checkpoint's tokenizer files

- ONNX graphs (``emit``): ``main(inputs..., weights...)`` lowered by the TVM
  backend (``graph``), int4 weights in MLC's layout (``graph_kernels``),
  float16 weights kept float16 (``half_params``).
- The same module always compiles to the same library bytes (``deterministic``).
- LLM checkpoints (``emit_checkpoint``; a Hugging Face LLaMA-family folder):
  ``prefill`` / ``decode`` over a KV cache, weights in MLC's quantization
  modes ``q0f32``, ``q0f16``, ``q4f16_1``, ``q4f32_1`` (``llm``, ``modes``).
- ``load`` checks every shard's md5, memory-maps the shards and runs the
  library (``loader``); ``kiln generate`` decodes greedily with the packaged
  tokenizer (``generate``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx_ir as ir

from targets.mlc.host import problem as _host_problem

__all__ = ["legalize", "emit", "load", "emit_checkpoint", "verify_checkpoint", "cannot_verify"]


def legalize(model: ir.Model, spec: Any) -> list[str]:
    from targets.tvm.legalize import legalize as tvm_legalize

    return tvm_legalize(model, spec)


def emit(model: ir.Model, spec: Any, out_dir: Path, options: dict[str, Any] | None = None) -> Any:
    from targets.mlc.graph import emit as emit_graph

    return emit_graph(model, spec, out_dir, options)


def emit_checkpoint(ck: Any, spec: Any, out_dir: Path, scheme: Any = None, log: Any = None) -> Any:
    from targets.mlc.llm import emit_checkpoint as emit_llm

    return emit_llm(ck, spec, out_dir, scheme, log)


def verify_checkpoint(folder: Path, manifest: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    from targets.mlc.llm import verify_checkpoint as verify_llm

    return verify_llm(folder, manifest, seed)


def cannot_verify(artifact_dir: Path, manifest: dict[str, Any]) -> str | None:
    return _host_problem(manifest)


def load(artifact_dir: Path, manifest: dict[str, Any]) -> Any:
    from targets.mlc.loader import load as load_package

    return load_package(Path(artifact_dir), manifest)
