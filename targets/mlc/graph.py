"""ONNX graphs -> an MLC package: ``lib.so`` whose ``main`` takes the weights as parameters + the weight cache.

Lowering and building are the TVM backend's, as ``--emit tvm --params
external`` does them (``targets.tvm.lower``: sizable float weights and every
quantized weight's packed storage become trailing parameters of ``main``;
``targets.tvm.build.lift_param_transforms``: weight-only work such as
convolution kernel layouts is done once at packaging time); the prepared
weights go to the package's tensor cache instead of the library.

Weights are stored as MLC-LLM stores them:

- int4 weights of matmuls and embedding lookups in MLC's ``q4f16_1`` /
  ``q4f32_1`` layout (the TVM backend's ``words`` layout: eight codes per
  uint32, [N, K/8], scales [N, K/32] in float16 / float32), decoded inside the
  matmul and gather kernels; other quantized weights (convolutions) in the TVM
  backend's own packed form;
- ``q0f16``: float16 weights stay float16 (``half_params``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from compiler.errors import KilnError
from targets.backend import EmitResult
from targets.mlc import graph_kernels, half_params, library, tensor_cache

EMIT_OPTIONS: dict[str, str] = {}


def describe_quantization(values: list[np.ndarray], packed: int) -> str:
    """The stored weights' encoding: an MLC mode name where they fit one, plus ``+tvm-packed`` when some
    quantized weights (convolutions) are in the TVM backend's own packed form.

    ``values``: the params in main's order, the first ``packed`` of them quantized storage (each words
    tensor followed by its scales).
    """
    if packed:
        words = [i for i in range(packed) if values[i].dtype == np.uint32]
        scales = {str(values[i + 1].dtype) for i in words}
        mode = {"float16": "q4f16_1", "float32": "q4f32_1"}.get(scales.pop()) if len(scales) == 1 else None
        rest = packed - 2 * len(words)
        return "+".join(([mode] if mode else []) + (["tvm-packed"] if rest or not mode else []))
    floats = {str(v.dtype) for v in values if v.dtype.kind == "f" and v.size >= half_params.MIN_ELEMENTS}
    return "q0f16" if floats == {"float16"} else "q0f32"


def _has_half_weights(model: ir.Model) -> bool:
    return any(v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT16
               for v in model.graph.initializers.values())


def emit(model: ir.Model, spec: Any, out_dir: Path, options: dict[str, Any] | None = None) -> EmitResult:
    from targets.tvm import _env, lower
    from targets.tvm import build as tvm_build

    if options:
        raise KilnError(f"unknown --emit mlc option(s): {', '.join(sorted(options))}",
                        hint="--emit mlc takes no options (the weights always stay outside the library)")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    lowered = lower.lower(model, int4_layout="words")
    mod, scheduled = graph_kernels.schedule_qmatmuls(lowered.mod)
    lowered.mod = mod
    n_inputs = len(lowered.inputs)
    n_packed = len(lowered.quant.storage)
    target = library.target_of(spec)
    # weight-only work (transposes, convolution kernel layouts) done once here, as --emit tvm does
    mod, names, values = tvm_build.lift_param_transforms(lowered.mod, target, n_inputs, lowered.params,
                                                         lowered.arrays, channels_last=target.kind.name == "llvm")
    narrowed = 0
    if _has_half_weights(model):  # the preparation widened them: back to float16, widened in the library
        mod, values, narrowed = half_params.narrow(mod, n_inputs, values, skip=n_packed)
    timings["lower"] = time.perf_counter() - start
    linked, more = library.build(mod, spec, out_dir, n_inputs=n_inputs)
    timings.update(more)
    quantization = describe_quantization(values, n_packed)
    cache_files = tensor_cache.write(zip(names, values), out_dir, metadata={"quantization": quantization})
    extra: dict[str, Any] = {
        "kind": "graph",
        "tvm": _env.versions(),
        "library": linked.file,
        "linker": linked.linker,
        "inputs": lowered.inputs,
        "params": names,
        "quantization": quantization,
        "shards": len(cache_files) - 1,
    }
    if lowered.quant.storage:
        extra["packed"] = {**lowered.quant.to_json(), "scheduled_qmatmul_kernels": scheduled}
    if narrowed:
        extra["float16_params"] = narrowed
    if linked.note:
        extra["notes"] = [linked.note]
    emit.last_timings = timings  # type: ignore[attr-defined]  # for bench/mlc.py; never written to files
    return EmitResult(files=[linked.file, *cache_files], entry=linked.file, extra=extra)
