"""kiln -O2/-O3 against onnxslim on real models: node counts, onnxruntime latency, optimize time.

For each model of ``tests/model_zoo.py`` (EfficientNet-Lite0 and
all-MiniLM-L6-v2 with real weights, tiny seeded Llama / Qwen2 / GPT-2
decoders) the bench builds four variants of the export:

- ``original``: the torch export as is;
- ``onnxslim``: ``onnxslim.slim(model)`` (default options);
- ``kiln -O2`` / ``kiln -O3``: ``compiler.compile(..., target=x86_64-linux-gnu,
  emit="onnx", opt_level=N)``'s ``model.onnx`` (-O3 uses onnxruntime's
  com.microsoft contrib ops on this target).

It prints, per model: main-graph node counts, as saved and as onnxruntime's
own graph optimizations leave them ("ort nodes": what the session runs);
onnxruntime CPU latency (one session per variant in this process,
``intra_op_num_threads`` = ``--threads`` (default 1), ``inter_op_num_threads``
= 1, sequential execution, graph optimization level ``--ort-opt`` (default
all); after ``--warmup`` runs each, the median of ``--runs`` runs taken
round-robin across the variants, so drift and neighbours' load hit them
alike; "iqr %" is the interquartile range over the median); the largest
output difference from the original; and the optimize time of onnxslim
(``slim`` on a loaded proto), of kiln's PassManager (the -O pipeline on an
imported model) and of the whole ``compiler.compile`` (import, passes, emit,
verification run). Then ratios (-O3 / onnxslim, -O3 / original) and a GOAL
line: -O3 has no more nodes than onnxslim and is no slower, and on the
transformer models it is faster than the original. ``--histogram`` prints the
op types whose counts differ between the variants, saved and after
onnxruntime's optimizations.

Latency differences of a few percent are noise on a shared machine: with
``--ort-opt all`` the four EfficientNet variants become the same 53-node
graph in onnxruntime and still measured up to 3 % apart.

Run: python bench/fusion.py [--models efficientnet_lite0,minilm,...] [--runs 100]
     [--threads 1] [--ort-opt all|extended|basic|disable] [--cache DIR] [--histogram]
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import compiler  # noqa: E402
from compiler.importers.onnx_file import import_onnx  # noqa: E402
from compiler.passes import PassManager, opt_level_pipeline  # noqa: E402
from tests import model_zoo  # noqa: E402

TARGET = "x86_64-linux-gnu"
VARIANTS = ("original", "onnxslim", "kiln -O2", "kiln -O3")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "models" / "tiny_cnn.onnx"


def kiln_pipeline(level: int) -> str:
    """The pipeline ``compiler.compile`` runs at -O``level`` for TARGET with emit onnx."""
    from targets.triple import resolve_target

    spec = resolve_target(TARGET, None)
    return opt_level_pipeline(level, contrib=spec.onnx_runtime_contrib, gpu=spec.device != "cpu")


def histogram(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in model.graph.node)


def session(model: onnx.ModelProto, threads: int, level: str, save_to: Path | None = None):
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = levels[level]
    options.log_severity_level = 3
    if save_to is not None:
        options.optimized_model_filepath = str(save_to)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def warm_up_optimizers(tmp: Path) -> None:
    """Import and run everything once so the first model's times carry no import cost."""
    import onnxslim

    proto = onnx.load(str(EXAMPLE))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnxslim.slim(proto)
    for level in (2, 3):
        compiler.compile(str(EXAMPLE), target=TARGET, emit="onnx", opt_level=level, output=tmp / f"warm{level}")


def optimize(path: Path, tmp: Path) -> tuple[dict[str, onnx.ModelProto], dict[str, dict[str, float]]]:
    """The four variants and their optimize times in seconds ({variant: {"passes"|"compile": s}})."""
    import onnxslim

    original = onnx.load(str(path))
    variants = {"original": original}
    times: dict[str, dict[str, float]] = {}

    proto = onnx.ModelProto()
    proto.CopyFrom(original)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        slim = onnxslim.slim(proto)
        times["onnxslim"] = {"passes": time.perf_counter() - start}
    variants["onnxslim"] = slim

    for level in (2, 3):
        name = f"kiln -O{level}"
        model, _ = import_onnx(str(path))
        pipeline = kiln_pipeline(level)
        start = time.perf_counter()
        PassManager(pipeline).run(model)
        passes_s = time.perf_counter() - start
        out = tmp / f"{path.stem}-O{level}"
        start = time.perf_counter()
        art = compiler.compile(str(path), target=TARGET, emit="onnx", opt_level=level, output=out)
        compile_s = time.perf_counter() - start
        times[name] = {"passes": passes_s, "compile": compile_s}
        variants[name] = onnx.load(str(Path(art.path) / "model.onnx"))
    return variants, times


def ort_optimized(variants: dict[str, onnx.ModelProto], threads: int, level: str, tmp: Path) -> dict[str, onnx.ModelProto]:
    """Each variant as onnxruntime's graph optimizations leave it (what the sessions run)."""
    out = {}
    for i, (name, model) in enumerate(variants.items()):
        path = tmp / f"ort-optimized-{i}.onnx"
        session(model, threads, level, save_to=path)
        out[name] = onnx.load(str(path))
    return out


def latencies(variants: dict[str, onnx.ModelProto], feeds, *, runs: int, warmup: int, threads: int, level: str):
    """({variant: median ms}, {variant: interquartile range in % of the median},
    {variant: max |output - original|}); runs interleaved round-robin."""
    sessions = {name: session(model, threads, level) for name, model in variants.items()}
    outputs = {name: s.run(None, feeds) for name, s in sessions.items()}
    diffs = {
        name: max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if np.size(b) else 0.0
                  for a, b in zip(out, outputs["original"]))
        for name, out in outputs.items()
    }
    for _ in range(warmup):
        for s in sessions.values():
            s.run(None, feeds)
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    clock = time.perf_counter
    for _ in range(runs):
        for name, s in sessions.items():
            start = clock()
            s.run(None, feeds)
            samples[name].append(clock() - start)
    spread = {}
    for name, t in samples.items():
        q1, _, q3 = statistics.quantiles(t, n=4)
        spread[name] = (q3 - q1) / statistics.median(t) * 100
    return {name: statistics.median(t) * 1e3 for name, t in samples.items()}, spread, diffs


def print_histogram(title: str, graphs: dict[str, onnx.ModelProto]) -> None:
    hists = {v: histogram(m) for v, m in graphs.items()}
    ops = sorted({op for h in hists.values() for op in h})
    differing = [op for op in ops if len({hists[v][op] for v in VARIANTS}) > 1]
    print(f"  {title:<40} " + " ".join(f"{v:>9}" for v in VARIANTS))
    for op in differing:
        print(f"    {op:<38} " + " ".join(f"{hists[v][op]:>9}" for v in VARIANTS))


def report(name: str, variants, ort_graphs, times, lat, spread, diffs, *, show_histogram: bool) -> dict:
    nodes = {v: len(m.graph.node) for v, m in variants.items()}
    ort_nodes = {v: len(m.graph.node) for v, m in ort_graphs.items()}
    print(f"\n  {'variant':<10} {'nodes':>6} {'ort nodes':>9} {'latency ms':>11} {'iqr %':>6} {'max|diff|':>10} {'optimize s':>11} {'compile s':>10}")
    for v in VARIANTS:
        t = times.get(v, {})
        opt = f"{t['passes']:.2f}" if "passes" in t else "-"
        comp = f"{t['compile']:.2f}" if "compile" in t else "-"
        print(f"  {v:<10} {nodes[v]:>6} {ort_nodes[v]:>9} {lat[v]:>11.3f} {spread[v]:>6.1f} {diffs[v]:>10.2e} {opt:>11} {comp:>10}")
    o3, slim, orig = "kiln -O3", "onnxslim", "original"
    transformer = name in model_zoo.TRANSFORMERS
    print(f"  ratios: -O3/onnxslim nodes {nodes[o3] / nodes[slim]:.2f}, ort nodes {ort_nodes[o3] / ort_nodes[slim]:.2f}, "
          f"latency {lat[o3] / lat[slim]:.3f}; -O3/original nodes {nodes[o3] / nodes[orig]:.2f}, "
          f"latency {lat[o3] / lat[orig]:.3f}; -O2/onnxslim latency {lat['kiln -O2'] / lat[slim]:.3f}")
    checks = [
        (f"nodes {nodes[o3]} <= onnxslim {nodes[slim]}", nodes[o3] <= nodes[slim]),
        (f"latency {lat[o3]:.3f} <= onnxslim {lat[slim]:.3f} ms", lat[o3] <= lat[slim]),
    ]
    if transformer:
        checks.append((f"latency {lat[o3]:.3f} < original {lat[orig]:.3f} ms", lat[o3] < lat[orig]))
    met = all(ok for _, ok in checks)
    print(f"  GOAL {name}: {'MET' if met else 'MISSED'} -- " + "; ".join(f"{text} {'ok' if ok else 'NO'}" for text, ok in checks))
    if show_histogram:
        print_histogram("op counts that differ (saved graphs)", variants)
        print_histogram("... after onnxruntime's optimizations", ort_graphs)
    return {"nodes": nodes, "ort_nodes": ort_nodes, "latency": lat, "met": met}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(model_zoo.MODELS), help="comma-separated zoo models")
    parser.add_argument("--runs", type=int, default=100, help="timed runs per variant (median; >= 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs per variant first")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra_op_num_threads")
    parser.add_argument("--ort-opt", default="all", choices=("all", "extended", "basic", "disable"),
                        help="onnxruntime graph optimization level of every session")
    parser.add_argument("--cache", default=None, help="folder for the exports (default: a temporary one)")
    parser.add_argument("--histogram", action="store_true", help="print the op types whose counts differ")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in model_zoo.MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(model_zoo.MODELS)}")
    if args.runs < 20:
        parser.error("--runs must be at least 20")

    import onnxruntime as ort
    import onnxslim

    print(f"onnxruntime {ort.__version__} CPUExecutionProvider, intra_op_num_threads={args.threads}, "
          f"inter_op_num_threads=1, sequential, graph optimization level {args.ort_opt}; "
          f"median of {args.runs} runs after {args.warmup} warm-up, round-robin across variants")
    print(f"onnxslim {onnxslim.__version__}; kiln target {TARGET}, emit onnx; "
          f"optimize s = onnxslim.slim / kiln PassManager; compile s = whole compiler.compile (incl. verification run)")
    results = {}
    with tempfile.TemporaryDirectory(prefix="kiln-bench-fusion-") as tmp_name:
        tmp = Path(tmp_name)
        cache = Path(args.cache) if args.cache else tmp / "zoo"
        warm_up_optimizers(tmp)
        for name in models:
            start = time.perf_counter()
            path = model_zoo.export(name, cache)
            export_s = time.perf_counter() - start
            feeds = model_zoo.sample_inputs(name)
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
            variants, times = optimize(path, tmp)
            ort_graphs = ort_optimized(variants, args.threads, args.ort_opt, tmp)
            lat, spread, diffs = latencies(variants, feeds, runs=args.runs, warmup=args.warmup,
                                   threads=args.threads, level=args.ort_opt)
            print(f"\n== {name}: {path.name} (export {export_s:.1f} s), inputs {shapes}", end="")
            results[name] = report(name, variants, ort_graphs, times, lat, spread, diffs, show_histogram=args.histogram)

    print("\nsummary: nodes (after onnxruntime's optimizations) and latency ms, " + " / ".join(VARIANTS))
    for name, r in results.items():
        counts = " / ".join(f"{r['nodes'][v]} ({r['ort_nodes'][v]})" for v in VARIANTS)
        times_ = " / ".join(f"{r['latency'][v]:.3f}" for v in VARIANTS)
        print(f"  {name:<19} {counts:<44} {times_:<36} {'MET' if r['met'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
