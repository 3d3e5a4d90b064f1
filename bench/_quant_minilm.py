"""bench/quantize.py section ``minilm``: all-MiniLM-L6-v2 (real weights), kiln vs onnxruntime's quantize_dynamic.

Rows: fp32 (the export as a user has it), kiln ``int8-dynamic``, ``w8`` and
static ``int8`` (``compiler.compile(..., opt_level=2, quantize=...)``; quantize
time is the whole compile: -O2, quantize, report, verification), onnxruntime
``quantize_dynamic`` with default options and with ``per_channel=True``.
When kiln's artifact still holds 8-bit ``DequantizeLinear`` weights, a
"+ encode_int8" row shows the same artifact after
``targets.onnx.encode_int8`` (the proposed ONNX-backend re-encoding).

Accuracy: mean over 256 held-out sentences (16 x 32 tokens per batch) of the
cosine between mean-pooled embeddings and fp32's. Calibration (static int8,
and the report of the dynamic one): 128 other sentences. Latency: one batch.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quantize import Row, compile_row, interleaved_latency, timed  # noqa: E402  (bench/ is on sys.path)

MODEL = "all-MiniLM-L6-v2"
SEQ, BATCH, EVAL_SENTENCES, CALIBRATION_SENTENCES = 32, 16, 256, 128


def rows(args) -> list[Row]:
    from tests import model_zoo, text_data

    work = Path(args.work) / "minilm"
    work.mkdir(parents=True, exist_ok=True)
    source = model_zoo.minilm(work)
    calibration = text_data.write_npz(work / "calibration.npz", CALIBRATION_SENTENCES, seq=SEQ)
    evaluation = text_data.feeds(EVAL_SENTENCES, batch=BATCH, seq=SEQ, start=text_data.HELD_OUT)

    out = [Row(MODEL, "fp32", "export", source)]
    for scheme, calib in (("int8-dynamic", calibration), ("w8", None), ("int8", calibration)):
        row = _kiln(work, source, scheme, calib)
        out.append(row)
        encoded = _encoded(work, row)
        if encoded is not None:
            out.append(encoded)
    out.append(_onnxruntime(work, source, per_channel=False))
    out.append(_onnxruntime(work, source, per_channel=True))

    reference = _hidden(source, evaluation)
    for row in out:
        if row.path.exists():
            cos = np.concatenate([text_data.embedding_cosine(ref, got, feed["attention_mask"])
                                  for ref, got, feed in zip(reference, _hidden(row.path, evaluation), evaluation)])
            row.metric, row.accuracy = "cosine", float(cos.mean())
    measurable = [r for r in out if r.path.exists()]
    interleaved_latency(measurable, evaluation[0], args.runs)
    return measurable + [r for r in out if not r.path.exists()]


def _kiln(work: Path, source: Path, scheme: str, calibration: Path | None) -> Row:
    import compiler

    folder = work / f"kiln-{scheme}"
    shutil.rmtree(folder, ignore_errors=True)
    row = Row(MODEL, scheme, "kiln -O2", folder / "model.onnx")
    compile_ = lambda verify: compiler.compile(  # noqa: E731
        str(source), output=folder, opt_level=2, quantize=scheme, verify=verify,
        calibration=None if calibration is None else str(calibration))
    artifact = compile_row(row, folder, compile_)
    if artifact is None:
        return row
    stage = getattr(getattr(artifact, "_quantization", None), "seconds", None)
    if stage is not None:  # the quantize stage (scheme + its accuracy report), out of the whole compile
        row.note = f"quantize stage {stage:.1f} s of the compile" + (f"; {row.note}" if row.note else "")
    return row


def _encoded(work: Path, row: Row) -> Row | None:
    """The artifact re-encoded by targets.onnx.encode_int8, when it still has 8-bit DequantizeLinear weights."""
    if not row.path.exists():
        return None
    import onnx_ir as ir

    from targets.onnx.encode_int8 import encode_int8_weights

    model = ir.load(row.path)
    report, seconds = timed(lambda: encode_int8_weights(model))
    if not (report.folded_weights or report.gathered_tables):
        return None
    path = work / f"kiln-{row.scheme}-encode_int8.onnx"
    ir.save(model, path)
    return Row(MODEL, row.scheme, "kiln -O2 + encode_int8", path, quantize_s=(row.quantize_s or 0) + seconds,
               note=f"{report.folded_weights} weights folded, {report.gathered_tables} tables gathered")


def _onnxruntime(work: Path, source: Path, *, per_channel: bool) -> Row:
    from onnxruntime.quantization import quantize_dynamic

    path = work / f"ort-dynamic{'-per-channel' if per_channel else ''}.onnx"
    kwargs = {"per_channel": True} if per_channel else {}
    _, seconds = timed(lambda: quantize_dynamic(str(source), str(path), **kwargs))
    tool = "ort quantize_dynamic" + (" per_channel" if per_channel else "")
    return Row(MODEL, "int8-dynamic", tool, path, quantize_s=seconds)


def _hidden(path: Path, feeds) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return [sess.run(None, {k: v for k, v in feed.items() if k in names})[0] for feed in feeds]
