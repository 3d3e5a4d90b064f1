"""The quantize stage's entry for GGUF schemes: they are encoded by the gguf backend, never in a graph."""

from __future__ import annotations

from compiler.errors import KilnError


def apply(scheme, model, ctx):
    raise KilnError(f"--quantize {scheme.spec()} is a llama.cpp GGUF type: it applies to --emit gguf "
                    "from an LLM checkpoint (a Hugging Face folder or a .gguf file)",
                    hint="for ONNX graphs use w8, w4, int8, int8-dynamic, fp16, bf16, gptq-w4 or awq-w4")
