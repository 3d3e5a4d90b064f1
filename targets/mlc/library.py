"""Relax module -> the package's compiled library (``lib.so``, or ``lib.tar`` when no linker is here).

The weights stay parameters of every function (never bound into the
library), so one library serves any weight cache with the same shapes.

- Graph packages use the TVM backend's pipeline (``targets.tvm.build``), so
  they compute exactly what ``--emit tvm`` builds.
- LLM packages use TVM's default stages for the target kind, scheduled by the
  TVM backend's default CPU rules on CPUs and DLight's GPU rules (matmul,
  GEMV, reductions, fallback) on GPUs, as MLC-LLM does; the graph pipeline's
  layout conversion for convolutions is left out (it rewrites the KV-cache
  calls' variables, which TVM refuses, and LLMs have no convolutions).

Linking is the TVM backend's (``targets.tvm.export``). The same module gives
the same ``lib.so`` bytes (``deterministic``).
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Any

from targets.tvm.deterministic import canonical_shape_funcs


def target_of(spec: Any) -> Any:
    from targets.tvm import build as tvm_build

    return tvm_build.make_target(spec)


def build(mod: Any, spec: Any, out_dir: Path, *, llm: bool = False, n_inputs: int = 0) -> tuple[Any, dict[str, float]]:
    """Compile ``mod`` for ``spec`` and write the library; returns (Linked, timings)."""
    import tvm

    from targets.tvm import build as tvm_build
    from targets.tvm import export

    timings: dict[str, float] = {}
    target = target_of(spec)
    pipeline = llm_pipeline(target) if llm else tvm_build.relax_pipeline(target, n_inputs=n_inputs, late={})
    # the same module gives the same lib.so bytes (see ``deterministic``)
    pipeline = tvm.transform.Sequential([pipeline, canonical_shape_funcs()])
    start = time.perf_counter()
    executable = tvm.compile(mod, target, relax_pipeline=pipeline)
    timings["build"] = time.perf_counter() - start
    start = time.perf_counter()
    linked = export.export(executable, spec, out_dir)
    timings["link"] = time.perf_counter() - start
    return linked, timings


def _backend_module(target: Any) -> Any:
    kind = target.kind.name
    if kind == "llvm":
        name = "cpu_generic"
    elif kind in ("cuda", "rocm"):
        name = kind
    else:
        name = "gpu_generic"
    return importlib.import_module(f"tvm.relax.backend.{name}.pipeline")


def _schedule(target: Any) -> Any:
    from tvm.s_tir import dlight

    if target.kind.name == "llvm":
        from targets.tvm.schedule import default_cpu_schedule

        return default_cpu_schedule()
    gpu = dlight.gpu
    return dlight.ApplyDefaultSchedule(gpu.Matmul(), gpu.GEMV(), gpu.Reduction(), gpu.GeneralReduction(),
                                       gpu.Fallback())


def llm_pipeline(target: Any) -> Any:
    import tvm

    stages = _backend_module(target)
    passes = [*stages.library_dispatch_passes(target), *stages.legalize_passes(target), _schedule(target),
              *stages.dataflow_lower_passes(target), *stages.finalize_passes(target)]

    @tvm.transform.module_pass(opt_level=0, name="KilnMlcPipeline")
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline
