"""The backend contract: ``legalize``, ``emit``, ``load`` (+ ``cannot_verify`` for the driver's check)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import onnx_ir as ir

from compiler.errors import ArtifactError, KilnError
from targets.backend import EmitResult
from targets.tvm import _env
from targets.tvm.legalize import legalize

__all__ = ["RUN_OPTIONS", "cannot_verify", "emit", "legalize", "load"]

#: keyword options ``load`` takes beyond the contract (``kiln run --emulate / --rpc``)
RUN_OPTIONS = ("emulate", "rpc")

#: emit options (``compiler.compile(..., params="external")``, ``kiln compile --params external``)
EMIT_OPTIONS = {
    "params": "embedded (weights inside lib.so, the default) or external (params/ tensor cache)",
    "tune_trials": "MetaSchedule trials (0: no tuning, the default)",
    "tuning_db": "a folder keeping MetaSchedule records across compiles",
    "tune_tasks": "tune only the N kernels that take the most time (default 8)",
    "schedule": "default (kiln's CPU schedule) or none (TVM's unscheduled kernels)",
    "quiet": "no progress bar while tuning",
    "static_dims": "{name: size} fixing symbolic dims (e.g. batch=1): what MetaSchedule needs to tune those kernels",
}


def _options(options: dict[str, Any] | None) -> dict[str, Any]:
    opts = dict(options or {})
    unknown = sorted(set(opts) - set(EMIT_OPTIONS))
    if unknown:
        raise KilnError(f"unknown --emit tvm option(s): {', '.join(unknown)}",
                        hint="; ".join(f"{k}: {v}" for k, v in EMIT_OPTIONS.items()))
    mode = opts.get("params") or "embedded"
    if mode not in ("embedded", "external"):
        raise KilnError(f"params={mode!r}: expected embedded or external")
    opts["params"] = mode
    opts["tune_trials"] = int(opts.get("tune_trials") or 0)
    if opts["tune_trials"] < 0:
        raise KilnError("tune_trials must be >= 0")
    schedule = opts.get("schedule") or "default"
    if schedule not in ("default", "none"):
        raise KilnError(f"schedule={schedule!r}: expected default or none")
    opts["schedule"] = schedule
    dims = opts.get("static_dims") or {}
    if not isinstance(dims, dict) or not all(isinstance(k, str) and isinstance(v, int) and v > 0 for k, v in dims.items()):
        raise KilnError("static_dims must map dim names to positive sizes, e.g. {'batch': 1}")
    opts["static_dims"] = dict(dims)
    return opts


def emit(model: ir.Model, spec: Any, out_dir: Path, options: dict[str, Any] | None = None) -> EmitResult:
    """Lower, (tune,) build and link ``model`` for ``spec`` into ``out_dir``."""
    from targets.tvm import build, export, lower, params

    opts = _options(options)
    external = opts["params"] == "external"
    timings: dict[str, float] = {}
    start = time.perf_counter()
    lowered = lower.lower(model, static_dims=opts["static_dims"])
    timings["lower"] = time.perf_counter() - start
    target = build.make_target(spec)
    n_inputs = len(lowered.inputs)
    cpu_default = target.kind.name == "llvm" and opts["schedule"] == "default"
    start = time.perf_counter()
    mod, names, values = build.lift_param_transforms(lowered.mod, target, n_inputs, lowered.params, lowered.arrays,
                                                     channels_last=cpu_default)
    timings["prepare_params"] = time.perf_counter() - start

    database, tuning = None, None
    if opts["tune_trials"] or opts.get("tuning_db"):
        from targets.tvm import tune

        start = time.perf_counter()
        database, tuning = tune.tune(mod, target, spec, n_inputs=n_inputs, params=values,
                                     trials=opts["tune_trials"], db_dir=opts.get("tuning_db"),
                                     tasks=int(opts.get("tune_tasks") or tune.DEFAULT_TASKS), quiet=bool(opts.get("quiet")))
        timings["tune"] = time.perf_counter() - start

    late = {} if external else dict(enumerate(values))
    pipeline = build.relax_pipeline(target, n_inputs=n_inputs, late=late, database=database,
                                    default_schedule=opts["schedule"] == "default")
    start = time.perf_counter()
    schedule_used = _schedule_name(target, opts["schedule"])
    try:
        executable = build.build(mod, target, pipeline)
    except Exception as err:
        if not cpu_default:
            raise _build_error(err, spec) from None
        # kiln's CPU schedule is a heuristic: a kernel it cannot lower falls back to TVM's own (slow, correct)
        pipeline = build.relax_pipeline(target, n_inputs=n_inputs, late=late, database=database, default_schedule=False)
        try:
            executable = build.build(mod, target, pipeline)
        except Exception as err2:
            raise _build_error(err2, spec) from None
        schedule_used = f"unscheduled (kiln-cpu failed: {_last_line(err)})"
    timings["build"] = time.perf_counter() - start
    start = time.perf_counter()
    linked = export.export(executable, spec, out_dir)
    timings["link"] = time.perf_counter() - start

    files = [linked.file]
    param_info: dict[str, Any] = {"mode": opts["params"]}
    if external:
        files += params.write(dict(zip(names, values)), out_dir)
        param_info.update(dir=params.PARAMS_DIR, names=names)
    extra: dict[str, Any] = {
        "tvm": _env.versions(),
        "library": linked.file,
        "linker": linked.linker,
        "inputs": lowered.inputs,
        "params": param_info,
        "schedule": schedule_used,
    }
    if opts["static_dims"]:
        extra["static_dims"] = opts["static_dims"]
    if lowered.quant.storage:
        extra["quantized"] = lowered.quant.to_json()
    if tuning is not None:
        extra["tuning"] = tuning
    if linked.note:
        extra["notes"] = [linked.note]
    emit.last_timings = timings  # type: ignore[attr-defined]  # for bench/tvm.py; never written to files
    return EmitResult(files=files, entry=linked.file, extra=extra)


def _last_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(err).__name__


def _build_error(err: BaseException, spec: Any) -> KilnError:
    from compiler.errors import UnsupportedError

    return UnsupportedError(f"TVM cannot build the model for {spec.name} ({spec.device}): {_last_line(err)}")


def _schedule_name(target: Any, schedule: str) -> str:
    kind = target.kind.name
    if kind == "llvm":
        return "kiln-cpu" if schedule == "default" else "unscheduled"
    if kind == "opencl" and "adreno" in target.keys:
        return "dlight-adreno"
    return "dlight-gpu"


# ------------------------------------------------------------------ running


def _arch(manifest: dict[str, Any]) -> tuple[str, str]:
    from targets.triple import parse_triple

    triple = parse_triple(manifest["target"]["triple"])
    return triple.arch, triple.platform


def _host_problem(manifest: dict[str, Any]) -> str | None:
    """Why this artifact cannot run natively on this host (None when it can)."""
    device = manifest["target"]["device"]
    if device != "cpu":
        arch = manifest["target"].get("device_arch")
        return f"built for device {device}{':' + arch if arch else ''}; kiln runs TVM artifacts on this host's CPU only"
    arch, platform = _arch(manifest)
    if arch != _env.host_arch() or platform != "linux":
        return f"built for {manifest['target']['triple']}; this host is {_env.host_arch()}-linux"
    missing = _env.missing_cpu_features(manifest["target"]["tvm"].get("mattr", []))
    if missing:
        return f"needs CPU features this machine lacks: {', '.join(missing)}"
    return None


def _foreign(manifest: dict[str, Any]) -> bool:
    arch, platform = _arch(manifest)
    return arch != _env.host_arch() or platform != "linux"


def cannot_verify(artifact_dir: Path, manifest: dict[str, Any]) -> str | None:
    """Why the driver cannot run this artifact to check it (None: ``load`` will run it, emulated if need be)."""
    fixed = {k: v for k, v in manifest.get("backend", {}).get("static_dims", {}).items() if v != 1}
    if fixed:  # the driver's random inputs give every symbolic dim the size 1
        return "static dims " + ", ".join(f"{k}={v}" for k, v in fixed.items()) + " differ from the check's size 1"
    why = _host_problem(manifest)
    if why is None or manifest["target"]["device"] != "cpu" or not _foreign(manifest):
        return why
    from targets.tvm import emulate

    reason = emulate.unavailable_reason(manifest)
    return f"{why}, and it cannot be emulated here: {reason}" if reason else None


def load(artifact_dir: Path, manifest: dict[str, Any], *, emulate: bool | None = None, rpc: str | None = None) -> Any:
    """A runner for the artifact: on this host, under qemu (``emulate``; None = when needed), or over RPC."""
    _env.tvm()
    if rpc:
        from targets.tvm.rpc import RpcRunner

        return RpcRunner(artifact_dir, manifest, rpc)
    why = _host_problem(manifest)
    if why is None:
        if emulate:
            raise ArtifactError(f"{artifact_dir}: --emulate is for artifacts of another architecture; "
                                f"this one runs natively here (drop --emulate)")
        from targets.tvm.run import HostRunner

        return HostRunner(artifact_dir, manifest)
    if manifest["target"]["device"] == "cpu" and _foreign(manifest) and emulate is not False:
        from targets.tvm.emulate import EmulatedRunner

        return EmulatedRunner(artifact_dir, manifest)
    hint = " (add --emulate to run it under qemu)" if _foreign(manifest) and manifest["target"]["device"] == "cpu" else ""
    raise ArtifactError(f"{artifact_dir}: cannot run it on this host: {why}{hint}")
