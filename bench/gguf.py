"""GGUF benchmarks.

    python bench/gguf.py throughput [--mb 16] [--repeat 5]
    python bench/gguf.py rss [--gb 4.5] [--quantize q8_0] [--workdir DIR]

``throughput``: quantization speed (MB of float32 input per second, best of
``--repeat`` runs) of kiln's quantizers against the ``gguf`` package's numpy
quantizers (which cover F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1; its K-quants
raise NotImplementedError), both single-threaded (CPU time) -- for the 32-element types kiln's
compiled kernels ("native") and its numpy kernels (``KILN_NO_NATIVE=1``) separately -- and of
kiln with its thread pool (the converter's default, native where available) against the gguf
package, both in wall time.

``rss``: synthesizes a LLaMA-shaped bf16 safetensors checkpoint larger than ``--gb``
(sparse on disk: zeros, a few random rows), converts it with ``kiln compile --emit gguf
--no-verify`` in a child process and reports the child's peak resident set against the
checkpoint size and kiln's bound of 1.5 GB + 2 x the largest tensor (as float32).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# this file is named like the gguf package it compares against: keep its folder off the import path
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

GGUF_PACKAGE_TYPES = ("F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def _best(fn, repeat: int, clock=time.perf_counter) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = clock()
        fn()
        best = min(best, clock() - t)
    return best


def throughput(mb: float, repeat: int) -> None:
    """Single-threaded figures use CPU time (process_time), which other processes on a shared
    machine disturb far less than wall time. kiln's pool (its default, one thread per usable core)
    is wall time, against the gguf package's wall time in the same run."""
    import gguf

    from targets.gguf import quants as Q

    cols = 4096
    rows = max(1, int(mb * 1e6 / 4 / cols))
    x = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    size = x.nbytes / 1e6
    threads = Q._THREADS
    print(f"{rows}x{cols} float32 ({size:.1f} MB), best of {repeat}; kiln pool: {threads} threads "
          f"({len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} usable CPUs); "
          f"load average {os.getloadavg()[0]:.1f}")
    from targets.gguf.quants import native

    print(f"native kernels: {'loaded' if native.library() is not None else 'UNAVAILABLE (numpy fallback)'}")
    print(f"{'type':<6} {'native 1 thr':>13} {'numpy 1 thr':>12} {'gguf package':>13} {'native':>7} {'numpy':>6}   "
          f"{'kiln pool wall':>15} {'gguf wall':>10} {'ratio':>6}")
    cpu = time.process_time

    def numpy_only(fn):
        os.environ["KILN_NO_NATIVE"] = "1"
        native.reset()
        try:
            return fn()
        finally:
            del os.environ["KILN_NO_NATIVE"]
            native.reset()

    for name in ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]:
        slow = name.endswith("_K")
        data = x[: max(1, rows // 8)] if slow else x
        mbytes = data.nbytes / 1e6
        reps = 1 if slow else repeat
        Q._THREADS, Q._POOL = 1, None
        one = mbytes / _best(lambda: Q.quantize(data, name), reps, cpu)
        has_native = name in native.KERNELS and native.library() is not None
        py = numpy_only(lambda: mbytes / _best(lambda: Q.quantize(data, name), reps, cpu)) if has_native else one
        Q._THREADS, Q._POOL = threads, None
        pool = mbytes / _best(lambda: Q.quantize(data, name), reps)
        nat = f"{one:>8.0f} MB/s" if has_native else f"{'-':>13}"
        if name in GGUF_PACKAGE_TYPES:
            qt = getattr(gguf.GGMLQuantizationType, name)
            theirs = mbytes / _best(lambda: gguf.quants.quantize(data, qt), reps, cpu)
            theirs_wall = mbytes / _best(lambda: gguf.quants.quantize(data, qt), reps)
            nat_ratio = f"{one / theirs:>6.2f}x" if has_native else f"{'-':>7}"
            print(f"{name:<6} {nat} {py:>7.0f} MB/s {theirs:>8.0f} MB/s {nat_ratio} {py / theirs:>5.2f}x   "
                  f"{pool:>10.0f} MB/s {theirs_wall:>5.0f} MB/s {pool / theirs_wall:>5.2f}x")
        else:
            print(f"{name:<6} {nat} {py:>7.1f} MB/s {'-':>13} {'-':>7} {'-':>6}   "
                  f"{pool:>10.1f} MB/s {'-':>10} {'-':>6}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


def _llama_shapes(target_gb: float) -> tuple[dict, dict[str, list[int]]]:
    hidden, ff, vocab, heads = 2560, 6912, 32000, 20
    per_layer = 4 * hidden * hidden + 3 * hidden * ff + 2 * hidden
    layers = max(1, int((target_gb * 1e9 / 2 - 2 * vocab * hidden) / per_layer) + 1)
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "intermediate_size": ff,
              "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
              "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False}
    shapes = {"model.embed_tokens.weight": [vocab, hidden], "model.norm.weight": [hidden],
              "lm_head.weight": [vocab, hidden]}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": [hidden], p + "post_attention_layernorm.weight": [hidden],
                       p + "self_attn.q_proj.weight": [hidden, hidden], p + "self_attn.k_proj.weight": [hidden, hidden],
                       p + "self_attn.v_proj.weight": [hidden, hidden], p + "self_attn.o_proj.weight": [hidden, hidden],
                       p + "mlp.gate_proj.weight": [ff, hidden], p + "mlp.up_proj.weight": [ff, hidden],
                       p + "mlp.down_proj.weight": [hidden, ff]})
    return config, shapes


def synthesize(folder: Path, target_gb: float) -> tuple[int, int]:
    """A sparse bf16 safetensors checkpoint: (file bytes, largest tensor's float32 bytes)."""
    config, shapes = _llama_shapes(target_gb)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = folder / "model.safetensors"
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        start = f.tell()
        for name, info in header.items():  # a little real data in every tensor, the rest stays a hole
            first = rng.standard_normal(min(4096, info["shape"][-1])).astype(np.float32)
            f.seek(start + info["data_offsets"][0])
            f.write((first.view(np.uint32) >> 16).astype(np.uint16).tobytes())
        f.truncate(start + offset)
    largest = max(int(np.prod(s)) for s in shapes.values()) * 4
    return path.stat().st_size, largest


def rss(target_gb: float, quantize: str, workdir: str | None) -> None:
    root = Path(workdir or tempfile.mkdtemp(prefix="kiln-bench-gguf-"))
    try:
        size, largest = synthesize(root / "ckpt", target_gb)
        print(f"synthesized {size / 1e9:.2f} GB bf16 checkpoint (largest tensor {largest / 1e6:.0f} MB as float32)")
        cmd = [sys.executable, "-m", "compiler.cli", "compile", str(root / "ckpt"), "--emit", "gguf",
               "--quantize", quantize, "--no-verify", "-q", "-o", str(root / "out")]
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        if status != 0:
            raise SystemExit(f"kiln compile failed with status {status}")
        peak = usage.ru_maxrss * 1024
        bound = 1.5e9 + 2 * largest
        out = (root / "out" / "model.gguf").stat().st_size
        print(f"kiln compile --quantize {quantize}: {wall:.0f} s, output {out / 1e9:.2f} GB")
        print(f"peak RSS {peak / 1e9:.2f} GB = {peak / size:.2f} x the checkpoint; "
              f"bound 1.5 GB + 2 x largest = {bound / 1e9:.2f} GB -> {'within' if peak <= bound else 'OVER'}")
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--mb", type=float, default=16)
    t.add_argument("--repeat", type=int, default=5)
    r = sub.add_parser("rss")
    r.add_argument("--gb", type=float, default=4.5)
    r.add_argument("--quantize", default="q8_0")
    r.add_argument("--workdir")
    args = parser.parse_args()
    if args.what == "throughput":
        throughput(args.mb, args.repeat)
    else:
        rss(args.gb, args.quantize, args.workdir)


if __name__ == "__main__":
    main()
