"""Relax module -> TVM executable: the target, the pass pipeline, the schedules.

The pipeline is TVM's per-target default (library dispatch, legalize, fuse,
dataflow lowering, finalization; DLight's GPU rules on cuda, its Adreno
rules on ``opencl:adreno``) with, on CPU targets, TVM's fast-math rewrite
before legalization (exp, erf, tanh and softmax as polynomial kernels that
vectorize), and two kiln steps after fusion:

- packed quantized weights are bound into the module only after constant
  folding (so folding cannot expand them back into float32), unless the
  params stay external;
- on CPU targets, tuned schedules from a MetaSchedule database when one is
  given, then kiln's default CPU schedule (``schedule.py``) for every other
  kernel. TVM's CPU default leaves kernels unscheduled (serial, scalar).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np

from targets.tvm import _env
from targets.tvm.deterministic import canonical_shape_funcs


def make_target(spec: Any, llvm_overrides: Mapping[str, Any] | None = None) -> Any:
    """``tvm.target.Target`` for ``spec`` (its ``tvm`` dict; GPU targets carry their LLVM host)."""
    tvm = _env.tvm()
    data = copy.deepcopy(dict(spec.tvm))
    if llvm_overrides:
        llvm = data if data.get("kind") == "llvm" else data["host"]
        llvm.update(llvm_overrides)
    return tvm.target.Target(data)


def lift_param_transforms(mod: Any, target: Any, n_inputs: int, names: list[str],
                          arrays: Mapping[str, np.ndarray], *, channels_last: bool,
                          keep: int | None = None) -> tuple[Any, list[str], list[np.ndarray]]:
    """Compute everything that depends on the weights alone once, here, instead of in the artifact.

    ``main(inputs..., weights...)`` becomes ``main(inputs..., prepared...)``: TVM's
    ``LiftTransformParams`` splits the weight-only work (transposes, the HWIO
    layout of convolution kernels, Gemm's transB) into ``main_transform_params``,
    which is built for this host, run on the weights and dropped. Returns the new
    module, the prepared params' names and values (names of untouched weights are kept).
    The first ``keep`` weights (kiln's packed quantized storage; by default the count ``lower.lower``
    recorded in the module) are left as they are: what is computed from them (dequantization) must
    stay in the artifact, at run time.
    """
    tvm = _env.tvm()
    from tvm import relax

    if keep is None:  # recorded by lower.lower
        keep = int(mod.attrs["kiln.packed_params"]) if mod.attrs and "kiln.packed_params" in mod.attrs else 0
    main = mod["main"].with_attr("num_input", n_inputs + keep)  # LiftTransformParams lifts what follows
    mod.update_func(mod.get_global_var("main"), main)
    if channels_last and _has_conv2d(mod):
        # convolutions in NHWC with HWIO kernels: the CPU schedule vectorizes along output channels,
        # which are contiguous in both; the kernel transposes happen here, once
        try:
            with target:
                mod = tvm.transform.Sequential([relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]}),
                                                relax.transform.Normalize()])(mod)
        except Exception:  # a graph ConvertLayout cannot handle stays NCHW (slower, still correct)
            pass
    with target:
        mod = relax.transform.LiftTransformParams()(mod)
    main = mod["main"]
    kept = names[:keep]
    prepared = [str(p.name) for p in main.params[n_inputs + keep :]]
    if "main_transform_params" not in [gv.name_hint for gv in mod.get_global_vars()]:
        return mod, names, [arrays[n] for n in names]
    transform = mod["main_transform_params"]
    mod = _without(mod, "main_transform_params")
    host = tvm.target.Target({"kind": "llvm", "opt-level": 1})  # weight copies: fast to compile matters more
    helpers = {gv: f for gv, f in mod.functions_items() if not isinstance(f, relax.Function)}
    transform_mod = tvm.IRModule(helpers)  # the kernels the transform may call (emit_te ops on weights)
    transform_mod["main_transform_params"] = transform
    executable = tvm.compile(transform_mod, host)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    outputs = vm["main_transform_params"]([tvm.runtime.tensor(arrays[n]) for n in names[keep:]])
    values = [np.asarray(t.numpy()) for t in outputs]
    if len(values) != len(prepared):
        raise RuntimeError(f"main takes {len(prepared)} prepared params, the transform made {len(values)}")
    return mod, _unique(kept + prepared), [arrays[n] for n in kept] + values


def _has_conv2d(mod: Any) -> bool:
    from tvm import relax

    found = []

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.nn.conv2d":
            found.append(expr)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return bool(found)


def _without(mod: Any, name: str) -> Any:
    tvm = _env.tvm()
    funcs = {gv: f for gv, f in mod.functions_items() if gv.name_hint != name}
    return tvm.IRModule(funcs, attrs=mod.attrs)


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        if name in seen:
            seen[name] += 1
            name = f"{name}_{seen[name]}"
        seen.setdefault(name, 0)
        out.append(name)
    return out


def relax_pipeline(target: Any, *, n_inputs: int, late: Mapping[int, np.ndarray], database: Any = None,
                   default_schedule: bool = True) -> Any:
    """The Relax pass pipeline for ``target`` (see the module docstring)."""
    tvm = _env.tvm()

    passes = _stage(target, "library_dispatch_passes")
    if target.kind.name == "llvm":
        # exp/erf/tanh/softmax as TVM's polynomial kernels: LLVM has no vector exp or erf, so each element
        # was a scalar libm call (MiniLM, one thread: GELU matmul 2.5 -> 1.3 ms, softmax 0.74 -> 0.08 ms)
        from tvm import relax

        passes.append(relax.transform.FastMathTransform())
    passes += _stage(target, "legalize_passes")
    if late:
        passes.append(_bind_late(n_inputs, late))
    if target.kind.name == "llvm":
        if database is not None:
            passes.append(_apply_database(database))
        if default_schedule:
            from targets.tvm.schedule import default_cpu_schedule

            passes.append(default_cpu_schedule())
    passes += _stage(target, "dataflow_lower_passes") + _stage(target, "finalize_passes")
    # the same module gives the same library bytes (shape functions' store order, see ``deterministic``)
    passes.append(canonical_shape_funcs())

    @tvm.transform.module_pass(opt_level=0, name="KilnRelaxPipeline")
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def _stage(target: Any, name: str) -> list:
    """One stage of TVM's default pipeline for ``target``'s kind (read from the backend's own module:
    ``tvm.relax.pipeline``'s dispatchers miss some stages in 0.27)."""
    import importlib

    kind = target.kind.name
    if kind == "llvm":
        backend = "cpu_generic"
    elif kind in ("cuda", "rocm"):
        backend = kind
    elif kind == "opencl" and "adreno" in target.keys:
        backend = "adreno"
    else:
        backend = "gpu_generic"
    module = importlib.import_module(f"tvm.relax.backend.{backend}.pipeline")
    with target:  # some stages (Adreno's) read the current target while building their pass list
        return list(getattr(module, name)(target))


def _bind_late(n_inputs: int, late: Mapping[int, np.ndarray]) -> Any:
    """Bind ``main``'s params at these positions (after the inputs) to constants, after folding."""
    tvm = _env.tvm()
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="KilnBindPackedWeights")
    def _bind(mod: Any, _ctx: Any) -> Any:
        params = mod["main"].params
        binding = {params[n_inputs + i]: tvm.runtime.tensor(array) for i, array in late.items()}
        return relax.transform.BindParams("main", binding)(mod)

    return _bind


def _apply_database(database: Any) -> Any:
    tvm = _env.tvm()
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="KilnApplyTuned")
    def _apply(mod: Any, _ctx: Any) -> Any:
        with database:
            return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)

    return _apply


def build(mod: Any, target: Any, pipeline: Any) -> Any:
    """``tvm.compile`` with kiln's Relax pipeline."""
    tvm = _env.tvm()
    return tvm.compile(mod, target, relax_pipeline=pipeline)
