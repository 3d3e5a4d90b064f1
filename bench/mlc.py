"""MLC packages against onnxruntime on the same LLaMA-style decoder: package size, load time, decode tokens/s.

The model: a LlamaForCausalLM from a transformers config (default hidden 512,
8 layers, 8 heads, 4 KV heads, MLP 1536, about 25 M parameters; seeded random
weights) with a small byte-level BPE tokenizer, saved with ``save_pretrained``.

- ``mlc q0f32`` / ``mlc q4f16_1``: ``compiler.compile(folder, emit="mlc",
  quantize=MODE)``; load = ``LlmRunner(...)`` (md5 of every shard, memory
  map, library load); decode = ``LlmRunner.generate`` (prefill, then one
  ``decode`` call per token with the KV cache).
- ``onnxruntime fp32``: the same weights in a torch module with explicit
  past/present key-value tensors (written here from HF's definition, checked
  against transformers' logits), exported with ``torch.onnx.export``
  (opset 17, dynamic sequence and past lengths); load = ``InferenceSession``;
  decode = the same greedy loop feeding the presents back. Both loops run
  with Python's garbage collector paused.

Each figure is the median of ``--repeats`` runs; decode tokens/s counts the
tokens after the first (which comes from the prefill), for a ``--prompt``-token
prompt and ``--tokens`` new tokens. Both runtimes use ``--threads`` threads
(``TVM_NUM_THREADS``, ``intra_op_num_threads``). Package size is every file of
the package (library, shards, configs, tokenizer); onnxruntime's is
``model.onnx``. The greedy tokens of each MLC package are compared with
onnxruntime's (agreement = equal tokens at equal positions).

Run: python bench/mlc.py [--hidden 512] [--layers 8] [--tokens 64] [--prompt 16] [--threads 2]
     [--repeats 3] [--target x86-avx2] [--cache DIR]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# this folder holds bench/tvm.py, which would shadow the tvm package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))


def make_checkpoint(folder: Path, hidden: int, layers: int) -> Path:
    import transformers

    from tests.gguf import tiny

    if (folder / "config.json").is_file():
        return folder
    info = tiny.byte_level_tokenizer(folder, 320, pre="llama3")
    cfg = tiny.llama_config(info["size"], hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                            num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128),
                            max_position_embeddings=1024)
    model = transformers.LlamaForCausalLM(cfg)
    model.config.bos_token_id = model.config.eos_token_id = info["eos_id"]
    tiny.save_model(model, folder)
    return folder


# ------------------------------------------------------------------ onnxruntime


def export_onnx(folder: Path, path: Path) -> tuple[Path, int]:
    """The checkpoint as an ONNX decoder with explicit KV tensors; returns (path, max |logit diff| vs HF)."""
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)
    cfg = hf.config
    n_q, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // n_q
    inv_freq = hf.model.rotary_emb.inv_freq.detach().clone()

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w

    def rotate(x, cos, sin):
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    class KVDecoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hf = hf  # the weights become the graph's initializers

        def forward(self, input_ids, *past):
            n = input_ids.shape[1]
            p = past[0].shape[2]
            pos = torch.arange(n, dtype=torch.float32) + p
            angle = pos[:, None] * inv_freq[None, :]
            angle = torch.cat([angle, angle], -1)
            cos, sin = angle.cos()[None, None], angle.sin()[None, None]
            keys = torch.arange(p + n)
            mask = torch.where(keys[None, :] <= (torch.arange(n) + p)[:, None], 0.0, float("-inf"))
            h = hf.model.embed_tokens(input_ids)
            presents = []
            for i, layer in enumerate(hf.model.layers):
                a = layer.self_attn
                x = rms(h, layer.input_layernorm.weight)
                q = a.q_proj(x).view(1, n, n_q, hd).transpose(1, 2)
                k = a.k_proj(x).view(1, n, n_kv, hd).transpose(1, 2)
                v = a.v_proj(x).view(1, n, n_kv, hd).transpose(1, 2)
                q, k = rotate(q, cos, sin), rotate(k, cos, sin)
                k = torch.cat([past[2 * i], k], 2)
                v = torch.cat([past[2 * i + 1], v], 2)
                presents += [k, v]
                kr, vr = k.repeat_interleave(n_q // n_kv, 1), v.repeat_interleave(n_q // n_kv, 1)
                probs = torch.softmax(q @ kr.transpose(2, 3) / hd ** 0.5 + mask, -1)
                h = h + a.o_proj((probs @ vr).transpose(1, 2).reshape(1, n, n_q * hd))
                x = rms(h, layer.post_attention_layernorm.weight)
                m = layer.mlp
                h = h + m.down_proj(torch.nn.functional.silu(m.gate_proj(x)) * m.up_proj(x))
            return (hf.lm_head(rms(h, hf.model.norm.weight)), *presents)

    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    empty = [torch.zeros(1, n_kv, 0, hd) for _ in range(2 * cfg.num_hidden_layers)]
    with torch.no_grad():
        ours = KVDecoder()(ids, *empty)[0]
        diff = float((ours - hf(ids).logits).abs().max())
    names = [f"past_{kind}_{i}" for i in range(cfg.num_hidden_layers) for kind in ("key", "value")]
    outs = ["logits"] + [n.replace("past", "present") for n in names]
    dynamic = {"input_ids": {1: "n"}, **{n: {2: "past"} for n in names}, "logits": {1: "n"},
               **{n: {2: "total"} for n in outs[1:]}}
    past = [torch.zeros(1, n_kv, 3, hd) for _ in names]
    if not path.exists():
        import warnings

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(KVDecoder(), (ids, *past), str(path), input_names=["input_ids", *names],
                              output_names=outs, dynamic_axes=dynamic, opset_version=17, dynamo=False)
    return path, diff


class OrtDecoder:
    def __init__(self, path: Path, threads: int, n_kv: int, hd: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.past_names = [i.name for i in self.session.get_inputs()][1:]
        self.n_kv, self.hd = n_kv, hd

    def generate(self, prompt: list[int], steps: int) -> tuple[list[int], float]:
        gc.disable()  # as LlmRunner.generate does: no full collections mid-loop
        try:
            return self._generate(prompt, steps)
        finally:
            gc.enable()

    def _generate(self, prompt: list[int], steps: int) -> tuple[list[int], float]:
        past = {n: np.zeros((1, self.n_kv, 0, self.hd), np.float32) for n in self.past_names}
        outs = self.session.run(None, {"input_ids": np.asarray([prompt], np.int64), **past})
        tokens = [int(outs[0][0, -1].argmax())]
        start = time.perf_counter()
        while len(tokens) < steps:
            past = dict(zip(self.past_names, outs[1:]))
            outs = self.session.run(None, {"input_ids": np.asarray([[tokens[-1]]], np.int64), **past})
            tokens.append(int(outs[0][0, -1].argmax()))
        return tokens, (steps - 1) / (time.perf_counter() - start)


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--target", default="x86-avx2", help="kiln target of the packages (default x86-avx2)")
    ap.add_argument("--cache", type=Path, default=None)
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import compiler
    from compiler.api import load_artifact
    from compiler.importers.hf_checkpoint import import_checkpoint
    from targets.mlc import llm
    from targets.mlc.loader import LlmRunner

    root = args.cache or Path(tempfile.mkdtemp(prefix="kiln-bench-mlc-"))
    root.mkdir(parents=True, exist_ok=True)
    folder = make_checkpoint(root / f"llama-h{args.hidden}-l{args.layers}", args.hidden, args.layers)
    n_params = sum(int(np.prod(t.shape)) for t in import_checkpoint(folder).tensors)
    prompt = [int(t) for t in np.random.default_rng(0).integers(1, 300, args.prompt)]
    import tvm  # noqa: F401  (imported before the load timings)

    print(f"model: LlamaForCausalLM hidden {args.hidden}, {args.layers} layers, {n_params / 1e6:.1f} M parameters; "
          f"prompt {args.prompt} tokens, {args.tokens} new tokens, {args.threads} threads, "
          f"median of {args.repeats}")
    rows = []
    greedy: dict[str, list[int]] = {}
    for mode in ("q0f32", "q4f16_1"):
        out = root / f"pkg-{mode}-{args.target}-h{args.hidden}-l{args.layers}"
        start = time.perf_counter()
        if not (out / "manifest.json").is_file():
            compiler.compile(str(folder), target=args.target, emit="mlc", quantize=mode, output=out)
            timings = getattr(llm.emit_checkpoint, "last_timings", {})
        else:
            timings = {}
        compile_s = time.perf_counter() - start
        manifest = load_artifact(out).manifest
        size = sum(f["bytes"] for f in manifest["files"])
        weights = sum(f["bytes"] for f in manifest["files"] if f["path"].startswith("params_shard"))
        loads, speeds, prefills = [], [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            runner = LlmRunner(out, manifest)
            loads.append(time.perf_counter() - start)
            gen = runner.generate(prompt, args.tokens)
            speeds.append(gen.decode_tokens_per_second)
            prefills.append(gen.prefill_seconds)
            greedy[mode] = gen.tokens
            del runner
        rows.append((f"mlc {mode}", size, weights, statistics.median(loads), statistics.median(prefills),
                     statistics.median(speeds),
                     f"compile {compile_s:.1f} s (build {timings.get('build', 0):.1f}, link "
                     f"{timings.get('link', 0):.1f})" if timings else "cached package"))

    import transformers

    cfg = transformers.AutoConfig.from_pretrained(folder)
    onnx_path, diff = export_onnx(folder, root / f"llama-h{args.hidden}-l{args.layers}-kv.onnx")
    hd = cfg.hidden_size // cfg.num_attention_heads
    loads, speeds, prefills = [], [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        dec = OrtDecoder(onnx_path, args.threads, cfg.num_key_value_heads, hd)
        loads.append(time.perf_counter() - start)
        tokens, speed = dec.generate(prompt, args.tokens)
        speeds.append(speed)
        greedy["ort"] = tokens
    size = onnx_path.stat().st_size
    rows.append(("onnxruntime fp32", size, size, statistics.median(loads), float("nan"), statistics.median(speeds),
                 f"export checked vs transformers: max |logit diff| {diff:.2e}"))

    print(f"\n{'variant':<18} {'package MB':>10} {'weights MB':>10} {'load ms':>8} {'prefill ms':>10} "
          f"{'decode tok/s':>12}  notes")
    for name, size, weights, load, prefill, speed, note in rows:
        pre = f"{prefill * 1000:>10.1f}" if prefill == prefill else f"{'-':>10}"
        print(f"{name:<18} {size / 1e6:>10.2f} {weights / 1e6:>10.2f} {load * 1000:>8.1f} {pre} {speed:>12.1f}  {note}")
    ort_speed = rows[-1][5]
    for name, _size, _w, _l, _p, speed, _n in rows[:-1]:
        print(f"{name} / onnxruntime decode speed: {speed / ort_speed:.2f}x")
    for mode in ("q0f32", "q4f16_1"):
        same = sum(a == b for a, b in zip(greedy[mode], greedy["ort"]))
        print(f"greedy tokens, mlc {mode} vs onnxruntime fp32: {same}/{args.tokens} equal")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
