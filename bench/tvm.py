"""--emit tvm against onnxruntime: latency untuned (kiln's default CPU schedule) and after a bounded
MetaSchedule budget, and compile time.

    python bench/tvm.py [--trials 128] [--models efficientnet_lite0,minilm,...] [--no-tune] [--threads N] [--rounds N]

Per model, on this machine's CPU with all its cores or ``--threads N`` (onnxruntime and TVM alike):

- onnxruntime: the original fp32 model (all graph optimizations); for the int4 decoder, kiln's
  ``--emit onnx --quantize w4`` artifact (MatMulNBits) — the int4 bar to beat;
- kiln-TVM untuned: ``--emit tvm`` as compiled by default, and its compile time;
- kiln-TVM tuned: ``--tune-trials N`` (N in the table) on the kernels that take the time, with the
  symbolic dims fixed (``static_dims``; MetaSchedule tunes one shape), and its compile time (tuning
  included).

Latencies are the median of repeated runs after a warm-up (TVM: the VM's time_evaluator). The models:
EfficientNet-Lite0 (batch 1, 224x224), SqueezeNet from the onnx wheel, MiniLM (batch 1, 64 tokens) and a
w4 LLaMA-style decoder (about 10 M parameters, no KV cache) generating one token (batch 1, 1 token).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# this file is bench/tvm.py: drop its folder from the path, or `import tvm` would import this script
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

import compiler  # noqa: E402
from tests import model_zoo as mz  # noqa: E402
from tests import transformer_models as tm  # noqa: E402

DECODER = {"hidden_size": 512, "intermediate_size": 1408, "num_attention_heads": 8, "num_key_value_heads": 4,
           "vocab_size": 4096}
MODELS = ("efficientnet_lite0", "squeezenet", "minilm", "decoder_w4")


def _source(name: str, folder: Path) -> tuple[Path, dict[str, np.ndarray], dict[str, int], str | None]:
    """(model file, inputs, static dims for tuning, quantization scheme)."""
    if name == "squeezenet":
        import onnx

        from compiler.signature import random_inputs, signature
        from compiler.importers.onnx_file import import_onnx

        path = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_squeezenet.onnx"
        model, _ = import_onnx(path)
        return path, random_inputs(signature(model)["inputs"], seed=0), {}, None
    if name == "decoder_w4":
        return tm.export("llama", config=DECODER), tm.make_feeds(1, 1, vocab=DECODER["vocab_size"], pad=False), \
            {"batch": 1, "sequence": 1}, "w4"
    path = mz.export(name, folder)
    if name == "efficientnet_lite0":
        return path, mz.sample_inputs(name, batch=1), {"batch": 1}, None
    return path, mz.sample_inputs(name, batch=1, seq=64), {"batch": 1, "sequence": 64}, None


def _ort_ms(model: Path, feeds: dict, threads: int) -> float:
    return tm.ort_latency_ms(model, feeds, threads=threads, rounds=5, runs=10)


def _tvm_ms(art, feeds: dict) -> float:
    import tvm

    runner = art._runner
    args = [tvm.runtime.tensor(feeds[n], runner.device) for n in runner.input_names] + list(runner.params)
    runner.main(*args)
    timer = runner.vm.time_evaluator("main", runner.device, number=5, repeat=7, min_repeat_ms=200)
    return float(np.median(timer(*args).results)) * 1e3


def _default_target() -> str:
    """This machine's ISA, as onnxruntime uses it (it picks its kernels at run time): AVX2 + FMA when here."""
    from targets.tvm import _env

    return "x86-avx2" if not _env.missing_cpu_features(["+avx2", "+fma"]) else "x86_64-linux-gnu"


def _last_tune_seconds() -> float:
    from targets.tvm import backend

    return float(getattr(backend.emit, "last_timings", {}).get("tune", 0.0))


def _compile(source: Path, out: Path, **kw) -> tuple[object, float]:
    start = time.perf_counter()
    art = compiler.compile(str(source), emit="tvm", output=out, **kw)
    return art, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=128, help="MetaSchedule trials per model (default 128)")
    parser.add_argument("--tasks", type=int, default=8, help="kernels tuned per model (default 8)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--no-tune", action="store_true")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads for onnxruntime and TVM alike (default: all cores). On a machine other jobs "
                             "load, 1 measures the code: with every core asked for, each parallel kernel waits "
                             "for a descheduled thread")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure onnxruntime and each TVM build this many times, interleaved, and report "
                             "the medians (a loaded or shared machine: 5)")
    parser.add_argument("--target", default=_default_target(), help="kiln target (default: x86-avx2 when this CPU has it)")
    args = parser.parse_args()
    threads = args.threads or os.cpu_count() or 1
    os.environ["TVM_NUM_THREADS"] = str(threads)  # read when TVM's thread pool starts (not yet: nothing ran)
    rows = []
    tune_s, trials_run = 0.0, 0
    with tempfile.TemporaryDirectory(prefix="kiln-bench-tvm-") as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            source, feeds, dims, scheme = _source(name, work / "zoo")
            if scheme:  # the int4 bar: kiln's own onnxruntime artifact (MatMulNBits)
                ort_art = compiler.compile(str(source), emit="onnx", output=work / f"{name}-onnx", quantize=scheme)
                ort_model = ort_art.path / ort_art.manifest["entry"]
            else:
                ort_model = source
            art, t_untuned = _compile(source, work / f"{name}-tvm", target=args.target, quantize=scheme, static_dims=dims)
            tuned = t_tuned = None
            if not args.no_tune and args.trials > 0:
                tuned, t_tuned = _compile(source, work / f"{name}-tuned", target=args.target, quantize=scheme,
                                          static_dims=dims,
                                          tune_trials=args.trials, tune_tasks=args.tasks,
                                          tuning_db=str(work / f"{name}-db"), quiet=True)
                tune_s += _last_tune_seconds()
                trials_run += int(tuned.manifest["backend"].get("tuning", {}).get("trials", 0))
            # rounds interleave the runtimes, so a burst of load elsewhere hits each of them alike
            ort_runs, untuned_runs, tuned_runs = [], [], []
            for _ in range(max(args.rounds, 1)):
                ort_runs.append(_ort_ms(ort_model, feeds, threads))
                untuned_runs.append(_tvm_ms(art, feeds))
                if tuned is not None:
                    tuned_runs.append(_tvm_ms(tuned, feeds))
            ort_ms, untuned_ms = float(np.median(ort_runs)), float(np.median(untuned_runs))
            tuned_ms = float(np.median(tuned_runs)) if tuned_runs else None
            rows.append((name, ort_ms, untuned_ms, t_untuned, tuned_ms, t_tuned))
            print(f"done {name}", file=sys.stderr, flush=True)

    budget = "no tuning" if args.no_tune else (
        f"budget {args.trials} trials per model on its top {args.tasks} kernels; spent {trials_run} trials, "
        f"{tune_s / 60:.1f} min of tuning in all")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    rounds = f"; medians of {args.rounds} interleaved rounds" if args.rounds > 1 else ""
    print(f"\nkiln --emit tvm --target {args.target} vs onnxruntime, {threads} threads, load average {load}; "
          f"tuned = MetaSchedule, {budget}{rounds}\n")
    header = ("model", "onnxruntime ms", "TVM untuned ms", "x ort", "compile s", "TVM tuned ms", "x ort", "compile s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, ort_ms, u_ms, u_s, t_ms, t_s in rows:
        tuned = [f"{t_ms:.2f}", f"{t_ms / ort_ms:.2f}", f"{t_s:.0f}"] if t_ms is not None else ["-", "-", "-"]
        cells = [name, f"{ort_ms:.2f}", f"{u_ms:.2f}", f"{u_ms / ort_ms:.2f}", f"{u_s:.0f}", *tuned]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
