"""kiln's quantization schemes against onnxruntime's quantization tools, same data, same process.

Sections (one module each, ``bench/_quant_*.py``, each with ``rows(args) -> list[Row]``):

- ``effnet``: EfficientNet-Lite0 (real weights) on a few hundred crops/flips of
  scikit-image's and scikit-learn's sample photos, split calibration / evaluation:
  fp32, kiln ``int8`` vs onnxruntime ``quantize_static`` (QDQ, per-channel);
  accuracy = top-1 agreement with fp32 on the evaluation split.
- ``minilm``: all-MiniLM-L6-v2 (real weights) on a few hundred sentences:
  kiln ``int8``, ``int8-dynamic``, ``w8`` vs onnxruntime ``quantize_dynamic``;
  accuracy = mean embedding cosine vs fp32.
- ``decoder``: LLaMA-style decoder (random weights): kiln ``w4``, ``gptq-w4``,
  ``awq-w4`` vs onnxruntime ``MatMulNBitsQuantizer`` (RTN and GPTQ);
  accuracy = logits cosine / relative error vs fp32 on held-out token batches.

Each row: model, scheme, tool, artifact size (MB and × fp32), accuracy figure,
onnxruntime CPU latency (median of ``--runs``, interleaved across the rows of a
section, 1 thread), quantize time.

Run: python bench/quantize.py [--sections effnet,minilm,decoder] [--runs 30] [--cache DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SECTIONS = ("effnet", "minilm", "decoder")


@dataclasses.dataclass
class Row:
    model: str
    scheme: str
    tool: str
    path: Path  # the .onnx file (its external data beside it counts toward the size)
    metric: str = ""
    accuracy: float | None = None
    quantize_s: float | None = None
    latency_ms: float | None = None
    size_mb: float | None = None
    size_ratio: float | None = None
    note: str = ""


def model_bytes(path: Path) -> int:
    """Bytes of an .onnx file plus any external-data files next to it that it names."""
    import onnx

    total = path.stat().st_size
    proto = onnx.load(str(path), load_external_data=False)
    seen = set()
    for t in proto.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                total += (path.parent / entry.value).stat().st_size
    return total


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def compile_row(row: Row, folder: Path, compile_: Callable[[bool], object]) -> object | None:
    """``compile_(verify)`` timed into ``row.quantize_s``. An artifact that fails kiln's own check is rebuilt
    unverified and measured (the row's note says so); an error leaves no artifact (None, the note says why)."""
    import shutil

    from compiler.errors import KilnError, VerificationError

    try:
        artifact, row.quantize_s = timed(lambda: compile_(True))
    except VerificationError as err:  # keep the numbers, say the artifact failed kiln's own check
        row.note = f"verification failed ({err}); measured the unverified artifact"
        shutil.rmtree(folder, ignore_errors=True)
        artifact, row.quantize_s = timed(lambda: compile_(False))
    except (KilnError, ImportError, NotImplementedError) as err:
        row.note = f"error: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
        row.path = folder / "missing.onnx"
        return None
    return artifact


def interleaved_latency(rows: Sequence[Row], feeds: Mapping[str, np.ndarray], runs: int, warmup: int = 3) -> None:
    """Median latency of each row's model, runs taken round-robin across rows (1 intra-op thread)."""
    import onnxruntime as ort

    sessions = []
    for row in rows:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(row.path), opts, providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        sessions.append((sess, {k: v for k, v in feeds.items() if k in names}))
    for sess, feed in sessions:
        for _ in range(warmup):
            sess.run(None, feed)
    times: list[list[float]] = [[] for _ in rows]
    for _ in range(runs):
        for i, (sess, feed) in enumerate(sessions):
            start = time.perf_counter()
            sess.run(None, feed)
            times[i].append(time.perf_counter() - start)
    for row, t in zip(rows, times):
        row.latency_ms = float(np.median(t)) * 1e3


def finish(rows: Sequence[Row]) -> None:
    """Sizes and size ratios against the section's fp32 row."""
    base = next((r for r in rows if r.scheme == "fp32"), None)
    for row in rows:
        row.size_mb = model_bytes(row.path) / 1e6
    if base is not None:
        for row in rows:
            row.size_ratio = row.size_mb / base.size_mb


def print_table(rows: Sequence[Row]) -> None:
    base = {r.model: r for r in rows if r.scheme == "fp32"}
    head = f"{'model':<18} {'scheme':<16} {'tool':<26} {'MB':>8} {'×fp32':>6} {'accuracy':>22} {'ms':>8} {'×fp32':>6} {'quant s':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        acc = f"{r.metric} {r.accuracy:.4f}" if r.accuracy is not None else ""
        b = base.get(r.model)
        lat_ratio = f"{r.latency_ms / b.latency_ms:6.2f}" if b and r.latency_ms and b.latency_ms else ""
        print(f"{r.model:<18} {r.scheme:<16} {r.tool:<26} {r.size_mb or 0:>8.2f} {r.size_ratio or 0:>6.3f} {acc:>22} "
              f"{r.latency_ms or 0:>8.2f} {lat_ratio:>6} {'' if r.quantize_s is None else f'{r.quantize_s:8.1f}':>8}"
              + (f"  {r.note}" if r.note else ""))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--cache", help="folder for exports and artifacts (default: a temporary folder)")
    args = ap.parse_args(argv)
    work = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="kiln-bench-quant-"))
    work.mkdir(parents=True, exist_ok=True)
    args.work = work
    all_rows: list[Row] = []
    for name in args.sections.split(","):
        if name not in SECTIONS:
            ap.error(f"unknown section {name!r} (one of {', '.join(SECTIONS)})")
        module = importlib.import_module(f"_quant_{name}")
        rows = module.rows(args)
        finish(rows)
        print_table(rows)
        print()
        sys.stdout.flush()
        all_rows.extend(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
