"""bench/quantize.py section ``decoder``: a LLaMA-style decoder in int4, kiln vs onnxruntime's MatMulNBitsQuantizer.

The model: transformers' LLaMA with hidden 512, 4 layers, 8 heads (4 KV heads),
MLP 1376, vocab 8000, random weights (``tests.transformer_models``), exported
with the attention mask, no KV cache; outputs the logits. Random weights have no
salient channels, which trained LLMs all have and which GPTQ and AWQ exist for,
so three channels of every RMSNorm weight are scaled by 10 (the same model for
every row).

Rows (each tool gets the same fp32 export and calibrates on the same token
batches: kiln is handed 48 batches of 128 tokens and calibrates on 36, holding
12 back for its report; onnxruntime gets those 36):

- fp32;
- kiln ``w4`` (blocks of 32, its default), ``w4{block-size=128}``, ``gptq-w4``
  and ``awq-w4`` (blocks of 128): ``compiler.compile(..., opt_level=2,
  quantize=...)``; quantize time is the whole compile (-O2, quantize, report,
  verification); the artifact holds MatMulNBits (accuracy level 0) and
  GatherBlockQuantized for the embedding;
- the same three with ``embeddings=false`` (the embedding table kept fp32, as
  onnxruntime's quantizer leaves it);
- "acc4" rows: the same kiln artifact with MatMulNBits at accuracy level 4
  (int8 activations, what onnxruntime's own DQ->MatMul fusion uses);
- onnxruntime ``MatMulNBitsQuantizer`` with ``RTNWeightOnlyQuantConfig`` and
  ``GPTQWeightOnlyQuantConfig`` (blocks of 128, symmetric like kiln's; it
  quantizes MatMul weights only, so the embedding stays fp32).

kiln's -O2 folds the final RMSNorm gain into the LM head's weight rows
(``fold-scale-into-weights``) before quantizing, so its LM head has the 10x rows
in the weight itself; onnxruntime's tools quantize the export as it is.

Accuracy: over held-out token batches, the mean cosine of the logits with
fp32's and the share of positions whose top-1 token matches fp32's. Latency:
one 64-token prompt at batch 1 (the note adds one token at batch 1, decode-like).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quantize import Row, interleaved_latency, timed  # noqa: E402  (bench/ is on sys.path)

MODEL = "llama-512x4"
CONFIG = {"hidden_size": 512, "intermediate_size": 1376, "vocab_size": 8000, "num_attention_heads": 8,
          "num_key_value_heads": 4, "max_position_embeddings": 512}
LAYERS = 4
SALIENT_CHANNELS, SALIENT_FACTOR = 3, 10.0
CALIBRATION_BATCHES, EVAL_BATCHES, SEQ, PROMPT = 48, 8, 128, 64
KILN_SCHEMES = ("w4", "w4{block-size=128}", "gptq-w4", "awq-w4",
                # as onnxruntime's quantizer does: embedding table left in fp32
                "w4{block-size=128,embeddings=false}", "gptq-w4{embeddings=false}", "awq-w4{embeddings=false}")
ACC4_ROWS = ("w4", "gptq-w4", "awq-w4")


def rows(args) -> list[Row]:
    from tests import transformer_models as tm

    work = Path(args.work) / "decoder"
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("KILN_TX_CACHE", str(work / "exports"))
    fp32 = work / "fp32.onnx"
    if not fp32.exists():
        _plant_salient_channels(tm.export("llama", layers=LAYERS, config=CONFIG), fp32)
    vocab = CONFIG["vocab_size"]
    calibration = [tm.make_feeds(1, SEQ, vocab=vocab, pad=False, seed=s) for s in range(CALIBRATION_BATCHES)]
    evaluation = [tm.make_feeds(1, SEQ, vocab=vocab, pad=False, seed=1000 + s) for s in range(EVAL_BATCHES)]
    reference = _logits(fp32, evaluation)

    out: list[Row] = [Row(MODEL, "fp32", "-", fp32)]
    for scheme in KILN_SCHEMES:
        out.append(_kiln_row(scheme, fp32, work, calibration))
        if scheme in ACC4_ROWS:
            out.append(_acc4_row(out[-1], work))
    from passes.quantize.calibration import CalibrationSet
    from passes.quantize.stage import HOLDOUT

    calibrated_on = list(CalibrationSet.from_feeds(calibration).split(HOLDOUT)[0])  # what kiln's stage calibrates on
    for algo in ("RTN", "GPTQ"):
        row = _ort_row(algo, fp32, work, calibrated_on)
        if row.path.exists():
            out.append(row)
        else:
            print(f"decoder: onnxruntime {algo} {row.note}", file=sys.stderr)

    for row in out:
        got = _logits(row.path, evaluation)
        row.metric = "cos/top1"
        row.accuracy = float(np.mean([_cosine(g, r) for g, r in zip(got, reference)]))
        top1 = np.mean([np.mean(g.argmax(-1) == r.argmax(-1)) for g, r in zip(got, reference)])
        row.note = f"top1 {top1:.3f}"
    interleaved_latency(out, tm.make_feeds(1, 1, vocab=vocab, pad=False, seed=7), args.runs)
    one_token = {id(r): r.latency_ms for r in out}
    interleaved_latency(out, tm.make_feeds(1, PROMPT, vocab=vocab, pad=False, seed=7), args.runs)
    for r in out:
        r.note += f"; 1 token {one_token[id(r)]:.2f} ms"
    return out


def _plant_salient_channels(source: Path, target: Path) -> None:
    import onnx

    proto = onnx.load(str(source))
    rng = np.random.default_rng(0)
    for tensor in proto.graph.initializer:
        if "norm" in tensor.name and len(tensor.dims) == 1:
            array = onnx.numpy_helper.to_array(tensor).copy()
            array[rng.choice(array.shape[0], SALIENT_CHANNELS, replace=False)] *= SALIENT_FACTOR
            tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
    onnx.save(proto, str(target))


def _kiln_row(scheme: str, fp32: Path, work: Path, calibration: list[dict]) -> Row:
    import shutil

    import compiler

    folder = work / f"kiln-{scheme.replace('{', '_').replace('}', '').replace('=', '').replace(',', '_')}"
    shutil.rmtree(folder, ignore_errors=True)
    _, seconds = timed(lambda: compiler.compile(str(fp32), output=folder, opt_level=2, quantize=scheme,
                                                calibration=calibration))
    return Row(MODEL, scheme, "kiln", folder / "model.onnx", quantize_s=seconds)


def _acc4_row(row: Row, work: Path) -> Row:
    """The same artifact with every MatMulNBits at accuracy level 4."""
    import onnx

    proto = onnx.load(str(row.path))
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = 4
    path = row.path.parent.parent / f"{row.path.parent.name}-acc4.onnx"
    onnx.save(proto, str(path))
    return Row(MODEL, f"{row.scheme} acc4", "kiln", path, quantize_s=row.quantize_s)


def _ort_row(algo: str, fp32: Path, work: Path, calibration: list[dict]) -> Row:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        GPTQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
        RTNWeightOnlyQuantConfig,
    )

    class Feeds(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calibration)

        def get_next(self):
            return next(self.items, None)

        def __deepcopy__(self, memo):  # onnxruntime's GPTQ deep-copies the reader once per pass
            return Feeds()

    path = work / f"ort-{algo.lower()}.onnx"
    config = RTNWeightOnlyQuantConfig() if algo == "RTN" else GPTQWeightOnlyQuantConfig(Feeds(), block_size=128)

    def quantize() -> None:
        quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), block_size=128, is_symmetric=True, algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(path), use_external_data_format=False)

    try:
        _, seconds = timed(quantize)
    except Exception as err:  # a failing peer tool is a row, not a crash
        return Row(MODEL, f"{algo.lower()} (blocks of 128)", "onnxruntime MatMulNBits", path,
                   note=f"failed: {str(err).splitlines()[0][:80]}")
    return Row(MODEL, f"{algo.lower()} (blocks of 128)", "onnxruntime MatMulNBits", path, quantize_s=seconds)


def _logits(path: Path, feeds: list[dict]) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [sess.run(None, f)[0] for f in feeds]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over positions of the cosine between logit vectors."""
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    return float(np.mean(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))
