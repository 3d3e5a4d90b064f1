"""ONNX graphs -> an MLC package: ``lib.so`` whose ``main`` takes the weights as parameters + the weight cache.

Lowering and building are the TVM backend's, as ``--emit tvm --params
external`` does them (``targets.tvm.lower``: sizable float weights and every
quantized weight's packed storage become trailing parameters of ``main``;
``targets.tvm.build.lift_param_transforms``: weight-only work such as
convolution kernel layouts is done once at packaging time); the prepared
weights go to the package's tensor cache instead of the library.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from compiler.errors import KilnError
from compiler.ir.quant import get_quant
from targets.backend import EmitResult
from targets.mlc import library, tensor_cache

EMIT_OPTIONS: dict[str, str] = {}


def describe_quantization(model: ir.Model, values: list[np.ndarray]) -> str:
    """The stored weights' encoding: an MLC mode name where they fit one, else kiln's scheme names."""
    records = {get_quant(v) for v in model.graph.initializers.values()} - {None}
    if records:
        if all(r.bits == 4 and r.block_size == 32 and r.symmetric for r in records):
            return "q4f32_1"  # int4 groups of 32, float32 scales, in the TVM backend's packed layout
        return "+".join(sorted({r.scheme for r in records}))
    floats = {str(v.dtype) for v in values if v.dtype.kind == "f"}
    return "q0f16" if floats == {"float16"} else "q0f32"


def _widened(model: ir.Model, values: list[np.ndarray]) -> bool:
    """float16 weights in the model, none left in the cache (TVM's weight preparation folded their Casts)."""
    half = any(v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT16
               for v in model.graph.initializers.values())
    return half and not any(v.dtype == np.float16 for v in values)


def emit(model: ir.Model, spec: Any, out_dir: Path, options: dict[str, Any] | None = None) -> EmitResult:
    from targets.tvm import _env, lower
    from targets.tvm import build as tvm_build

    if options:
        raise KilnError(f"unknown --emit mlc option(s): {', '.join(sorted(options))}",
                        hint="--emit mlc takes no options (the weights always stay outside the library)")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    lowered = lower.lower(model)
    n_inputs = len(lowered.inputs)
    target = library.target_of(spec)
    # weight-only work (transposes, convolution kernel layouts) done once here, as --emit tvm does
    mod, names, values = tvm_build.lift_param_transforms(lowered.mod, target, n_inputs, lowered.params,
                                                         lowered.arrays, channels_last=target.kind.name == "llvm")
    timings["lower"] = time.perf_counter() - start
    linked, more = library.build(mod, spec, out_dir, n_inputs=n_inputs)
    timings.update(more)
    quantization = describe_quantization(model, values)
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
        extra["packed"] = lowered.quant.to_json()
    notes = [linked.note] if linked.note else []
    if _widened(model, values):
        notes.append("the float16 weights are stored as float32: TVM's weight preparation "
                     "(LiftTransformParams) folded their Casts")
    if notes:
        extra["notes"] = notes
    emit.last_timings = timings  # type: ignore[attr-defined]  # for bench/mlc.py; never written to files
    return EmitResult(files=[linked.file, *cache_files], entry=linked.file, extra=extra)
