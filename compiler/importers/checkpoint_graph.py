"""Checkpoint -> ``onnx_ir.Model``: the architecture's graph with the checkpoint's weights, so an LLM
checkpoint (Hugging Face folder or GGUF file) compiles like any ONNX model (``--emit onnx|tvm``).

Signature, as in kiln's ONNX exports of transformers models: inputs ``input_ids`` and ``attention_mask``
(int64, [batch, sequence]); decoders output ``logits`` [batch, sequence, vocab] (causal attention, no KV
cache), encoders ``last_hidden_state``. The model metadata (``compiler.ir.ModelMetadata``) records the
source format and hash, the architecture's hyper-parameters and the tokenizer (llama.cpp's
``tokenizer.ggml.*`` entries, as ``--emit gguf`` writes them).
"""

from __future__ import annotations

import json
from typing import Any

import onnx_ir as ir

from compiler.errors import UnsupportedError
from compiler.importers.checkpoint import Checkpoint
from compiler.ir.metadata import ModelMetadata, set_metadata

#: GGUF architecture -> module with ``build(ck, config, opset) -> (model, hparams)``
BUILDERS = {"llama": "graph_llama", "qwen2": "graph_llama", "gpt2": "graph_gpt2", "bert": "graph_bert"}
SUPPORTED = ("LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (SmolLM is LlamaForCausalLM), "
             "GPT2LMHeadModel, BertModel; GGUF files of architecture llama, qwen2, gpt2, bert")
#: opset per --emit: at 23 the -O2 fusions reach the standard RMSNormalization and Attention ops, which
#: onnxruntime 1.32 runs; other backends (TVM's ONNX frontend lacks both) get graph_ops.OPSET
EMIT_OPSET = {"onnx": 23}


def build_graph(ck: Checkpoint, emit: str = "onnx") -> ir.Model:
    import importlib

    from compiler.importers.graph_ops import OPSET

    module = BUILDERS.get(ck.arch)
    if module is None:
        raise UnsupportedError(f"{ck.path}: architecture {ck.arch!r} has no graph builder", hint=f"supported: {SUPPORTED}")
    config = hf_config(ck)
    model, hparams = importlib.import_module(f"compiler.importers.{module}").build(ck, config, EMIT_OPSET.get(emit, OPSET))
    # Hugging Face config names (what passes/prune/transformer.py rewrites after pruning)
    architecture = {"name": ck.arch, **({"hf": config["architectures"][0]} if config.get("architectures") else {}),
                    "model_name": _plain(ck.get("general.name")), **hparams}
    tokenizer = {k: _plain(v.value) for k, v in sorted(ck.metadata.items()) if k.startswith("tokenizer.")}
    provenance = [f"graph built by kiln from a {ck.source_format} checkpoint"] + list(ck.warnings)
    set_metadata(model, ModelMetadata(source_format=ck.source_format, source_sha256=ck.sha256,
                                      architecture=architecture, tokenizer=tokenizer, provenance=provenance))
    return model


def hf_config(ck: Checkpoint) -> dict[str, Any]:
    """config.json of a Hugging Face checkpoint (what the GGUF metadata does not carry: sliding windows,
    activations); {} for GGUF sources."""
    if not ck.source_format.startswith("hf"):
        return {}
    try:
        config = json.loads((ck.path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _plain(value: Any) -> Any:
    """JSON-ready: numpy scalars and bytes to Python values."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if hasattr(value, "item"):
        return value.item()
    return value
