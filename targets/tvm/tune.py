"""MetaSchedule tuning: spend a bounded trial budget on the kernels that take the time, keep the records.

``--tune-trials N --tuning-db DIR``:

1. The model is lowered and fused as for the build; each fused kernel with
   static shapes is a task (kernels with symbolic dims, e.g. a free batch, are
   left to the default schedule: MetaSchedule tunes one shape at a time).
2. Tasks are ranked by estimated work (FLOPs x calls) and only the top
   ``tune_tasks`` are tuned, ``N / tasks`` trials each: a budget spread thin
   over every kernel finds nothing (200 trials over a small CNN's 20 kernels
   made it slower in our measurements).
3. Each task's search space is MetaSchedule's own plus kiln's default CPU
   schedule, and before the search kiln's default is itself measured (same
   builder, same runner) and committed as a record: the database's best
   record is a tuned schedule only when that measured faster than the default;
   otherwise the default's own record wins and the build applies the default.
   (The search alone may not measure the default on a small budget: MiniLM
   ran 103 -> 161 ms after a 48-trial, 4-task tuning budget.)
4. Records go to a JSON database in DIR. A task whose workload already has a
   record there is not searched again: a second compile with the same DIR
   does no search at all. Without DIR the records live in a temporary folder.

The database is applied before kiln's default schedule; kernels it has no
record for keep the default.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from typing import Any

from compiler.errors import KilnError
from compiler.progress import Progress
from targets.tvm import _env

DEFAULT_TASKS = 8
MIN_TRIALS_PER_TASK = 8
BUILD_TIMEOUT_S = 60


def _build_candidate(mod: Any, target: Any, _params: Any) -> Any:
    """MetaSchedule's default candidate build without ``import tvm.s_tir.tensor_intrin``: that import
    registers every tensor intrinsic and takes about 30 s, longer than the builder's timeout, in each
    fresh worker process. kiln's fp32 CPU schedules never tensorize."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm.tirx.build(mod, target=target)


def tune(mod: Any, target: Any, spec: Any, *, n_inputs: int, params: list, trials: int, db_dir: str | None,
         tasks: int = DEFAULT_TASKS, quiet: bool = False) -> tuple[Any, dict[str, Any]]:
    """Tune ``mod``'s heaviest static kernels; returns (database, what happened for the manifest)."""
    _env.tvm()
    from tvm.s_tir import meta_schedule as ms

    _check_runs_here(spec, target)
    target = _with_cores(target)
    work_dir = os.path.abspath(db_dir) if db_dir else tempfile.mkdtemp(prefix="kiln-tune-")
    os.makedirs(work_dir, exist_ok=True)
    database = ms.database.JSONDatabase(work_dir=work_dir, module_equality="structural")
    candidates = _ranked_tasks(mod, target, n_inputs, params)
    # the budget bounds the search: fewer tasks, each with a real search, rather than a few trials each
    chosen = candidates[: max(1, min(tasks, trials // MIN_TRIALS_PER_TASK))] if trials > 0 else candidates[:tasks]
    todo = [t for t in chosen if not database.has_workload(t.dispatched[0])
            or not database.get_top_k(database.commit_workload(t.dispatched[0]), 1)]
    info: dict[str, Any] = {
        "trials_budget": trials,
        "tasks_static": len(candidates),
        "tasks_selected": [t.task_name for t in chosen],
        "tasks_reused": len(chosen) - len(todo),
        "tasks_searched": 0,
        "trials": 0,
    }
    if db_dir:
        info["database"] = os.path.basename(os.path.normpath(db_dir))
    if not todo or trials <= 0:
        return database, info

    per_task = max(trials // len(todo), 1)
    _cpu_tensor_intrinsics_only()
    contexts = [_context(t, target, work_dir, per_task) for t in todo]
    bar = Progress("tuning", per_task * len(todo), quiet=quiet)
    callbacks = list(ms.measure_callback.MeasureCallback.create("default")) + [_progress_callback(bar)]
    cost_model = "xgb" if _has_xgboost() else "random"
    builder = ms.builder.LocalBuilder(f_build=_build_candidate, timeout_sec=BUILD_TIMEOUT_S)
    runner = ms.runner.LocalRunner()
    with bar, _quiet_logs():
        info["default_measured"] = sum(_commit_default(database, t.dispatched[0], target, builder, runner)
                                       for t in todo)
        ms.tune_tasks(
            tasks=contexts, task_weights=[float(t.weight) for t in todo], work_dir=work_dir,
            max_trials_global=per_task * len(todo), max_trials_per_task=per_task,
            num_trials_per_iter=min(32, per_task), database=database, cost_model=cost_model,
            measure_callbacks=callbacks, builder=builder, runner=runner,
        )
    info["tasks_searched"] = len(todo)
    info["trials"] = bar.done
    return database, info


def _cpu_tensor_intrinsics_only() -> None:
    """Let ``TuneContext`` import ``tvm.s_tir.tensor_intrin`` without its CUDA half.

    That package's ``__init__`` parses hundreds of CUDA TVMScript intrinsics: 60 s of CPU here, most of a
    small tuning budget (tuning runs on this host's CPU, which never tensorizes with them). When nothing has
    imported it yet, the package is registered bare and only this CPU's intrinsics are imported (1.6 s).
    """
    import importlib
    import sys
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    import tvm.s_tir

    package = types.ModuleType(name, "tensor intrinsics (kiln: only this CPU's registered)")
    package.__path__ = [os.path.join(os.path.dirname(tvm.s_tir.__file__), "tensor_intrin")]
    package.__package__ = name
    sys.modules[name] = package
    tvm.s_tir.tensor_intrin = package
    own = {"x86_64": "x86", "aarch64": "arm_cpu"}.get(_env.host_arch())
    if own:
        try:
            setattr(package, own, importlib.import_module(f"{name}.{own}"))
        except Exception:  # intrinsics are an optimization of int8 schedules: tune without them
            pass


def _with_cores(target: Any) -> Any:
    """MetaSchedule sizes its parallel loops by the target's ``num-cores`` (this machine's, since it measures here)."""
    tvm = _env.tvm()
    try:
        import psutil

        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        cores = os.cpu_count() or 1
    data = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(target.export()).items()
            if k not in ("keys", "tag", "host") and not str(k).startswith("feature.")}
    data["num-cores"] = int(cores)
    return tvm.target.Target(data)


def _check_runs_here(spec: Any, target: Any) -> None:
    from targets.tvm.backend import _host_problem

    manifest_like = {"target": spec.to_json()}
    why = _host_problem(manifest_like) if target.kind.name == "llvm" else f"{target.kind.name} kernels cannot run here"
    if why:
        raise KilnError(f"--tune-trials measures kernels on this machine, and this target cannot run here: {why}",
                        hint="tune on the device, or compile without --tune-trials (kiln's default schedule)")


def _ranked_tasks(mod: Any, target: Any, n_inputs: int, params: list) -> list[Any]:
    """The fused kernels with static shapes, heaviest (FLOPs x calls) first."""
    tvm = _env.tvm()
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    from targets.tvm import build

    with target:
        fused = tvm.transform.Sequential(build._stage(target, "library_dispatch_passes")
                                         + build._stage(target, "legalize_passes"))(mod)
    extracted = ms.relax_integration.extract_tasks(fused, target)
    ranked = []
    for task in extracted:
        func_mod = task.dispatched[0]
        if not _static(func_mod):
            continue
        try:
            flops = float(s_tir.analysis.estimate_tir_flops(func_mod))
        except Exception:
            continue
        ranked.append((flops * task.weight, task))
    ranked.sort(key=lambda pair: -pair[0])
    return [task for _, task in ranked]


def _static(func_mod: Any) -> bool:
    from tvm import tirx

    for _, func in func_mod.functions_items():
        for param in func.params:
            shape = getattr(param.ty, "shape", None)
            if shape is not None and not all(isinstance(d, tirx.IntImm) for d in shape):
                return False
    return True


def _context(task: Any, target: Any, work_dir: str, trials: int) -> Any:
    """MetaSchedule's design space plus kiln's default CPU schedule for this kernel."""
    from tvm.s_tir import meta_schedule as ms

    def kiln_default(sch: Any) -> Any:
        return _default_schedule(sch.mod, target) or sch

    space = ms.space_generator.SpaceGeneratorUnion(
        [ms.space_generator.PostOrderApply(), ms.space_generator.ScheduleFn(kiln_default)])
    logger = logging.getLogger("kiln.tvm.tune")
    # the evolutionary search's population scales with the budget (its default of 512 samples costs
    # more time than a small budget's measurements)
    strategy = ms.search_strategy.EvolutionarySearch(
        population_size=min(512, max(64, 4 * trials)), init_min_unmeasured=min(50, max(8, trials)),
        genetic_num_iters=2 if trials < 128 else 4)
    return ms.TuneContext(mod=task.dispatched[0], target=target, space_generator=space,
                          search_strategy=strategy, task_name=task.task_name, logger=logger,
                          num_threads="physical").clone()


def _default_schedule(func_mod: Any, target: Any) -> Any:
    """kiln's default CPU schedule of this one-kernel module, as the build applies it (first rule that fits)."""
    from targets.tvm.schedule import RULE_ORDER, _rule_classes

    rules = _rule_classes()
    for name in RULE_ORDER:
        scheduled = rules[name]().apply(func_mod["main"], target, False)
        if scheduled is not None:
            return scheduled
    return None


def _commit_default(database: Any, func_mod: Any, target: Any, builder: Any, runner: Any) -> bool:
    """Measure kiln's default schedule of this kernel the way MetaSchedule measures its candidates and
    commit it as a tuning record, so the database's best is a tuned schedule only if it ran faster.
    False when the default cannot be built or run here (the search's best then stands alone)."""
    from tvm.s_tir import meta_schedule as ms

    sch = _default_schedule(func_mod, target)
    if sch is None:
        return False
    args_info = ms.arg_info.ArgInfo.from_prim_func(func_mod["main"])
    built = builder.build([ms.builder.BuilderInput(sch.mod, target)])[0]
    if built.error_msg or not built.artifact_path:
        return False
    try:
        ran = runner.run([ms.runner.RunnerInput(built.artifact_path, "cpu", args_info)])[0].result()
    finally:
        ms.utils.remove_build_dir(built.artifact_path)
    if ran.error_msg or not ran.run_secs:
        return False
    database.commit_tuning_record(ms.database.TuningRecord(
        trace=sch.trace, workload=database.commit_workload(func_mod),
        run_secs=[float(s) for s in ran.run_secs], target=target, args_info=args_info))
    return True


def _progress_callback(bar: Progress) -> Any:
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class _Progress(PyMeasureCallback):
        def apply(self, task_scheduler: Any, task_id: int, measure_candidates: list, builder_results: list,
                  runner_results: list) -> None:
            bar.update(len(runner_results), f"task {task_id}")

    return _Progress()


def _has_xgboost() -> bool:
    from importlib.util import find_spec

    return find_spec("xgboost") is not None


@contextlib.contextmanager
def _quiet_logs():
    """MetaSchedule logs every round to stdout and its loggers: kiln shows a progress bar instead."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    old = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(old)
