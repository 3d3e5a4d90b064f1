"""bench/quantize.py section ``effnet``: EfficientNet-Lite0 (real weights), kiln ``int8`` vs ort quantize_static.

Data: tests/image_data.py, crops and flips of scikit-image's and scikit-learn's
sample photos; the whole calibration split (168 images) goes to
``--calibration`` as an .npz, the whole evaluation split (168 other crops)
measures top-1 agreement with fp32.

Rows: fp32 (the export as a user has it), kiln ``int8`` with its default
observer and with each other one (``compiler.compile(..., opt_level=2,
quantize=...)``; quantize time is the whole compile: -O2, calibration, report,
verification), onnxruntime ``quantize_static`` (QDQ, per-channel, after
``quant_pre_process``) with its default S8S8 types and with U8S8, both fed
exactly the batches kiln's quantize stage calibrates on (the stage holds a
quarter back for its report) through a ``CalibrationDataReader``.
Latency: one image, 1 thread, runs interleaved across the rows.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quantize import Row, compile_row, interleaved_latency, timed  # noqa: E402  (bench/ is on sys.path)

MODEL = "EfficientNet-Lite0"
METHODS = ("percentile", "minmax", "entropy", "mse")  # the default first
SIGNATURE = [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 224, 224]}]


def rows(args) -> list[Row]:
    from tests import image_data, model_zoo

    work = Path(args.work) / "effnet"
    work.mkdir(parents=True, exist_ok=True)
    source = model_zoo.efficientnet_lite0(work)
    half = image_data.count() // 2
    calibration = image_data.write_npz(work / "calibration.npz", half)
    evaluation = image_data.evaluation(half)

    out = [Row(MODEL, "fp32", "export", source)]
    for method in METHODS:
        scheme = "int8" if method == METHODS[0] else f"int8{{method={method}}}"
        out.append(_kiln(work, source, scheme, calibration))
    out.append(_onnxruntime(work, source, calibration, activations="int8"))
    out.append(_onnxruntime(work, source, calibration, activations="uint8"))

    reference = _logits(source, evaluation).argmax(axis=1)
    for row in out:
        if row.path.exists():
            row.metric = "top1-agreement"
            row.accuracy = float((_logits(row.path, evaluation).argmax(axis=1) == reference).mean())
    measurable = [r for r in out if r.path.exists()]
    interleaved_latency(measurable, {"image": evaluation[:1]}, args.runs)
    return measurable + [r for r in out if not r.path.exists()]


def _kiln(work: Path, source: Path, scheme: str, calibration: Path) -> Row:
    import compiler

    folder = work / f"kiln-{scheme.replace('{', '-').replace('}', '').replace('=', '-')}"
    shutil.rmtree(folder, ignore_errors=True)
    row = Row(MODEL, scheme, "kiln -O2", folder / "model.onnx")
    compile_ = lambda verify: compiler.compile(  # noqa: E731
        str(source), output=folder, opt_level=2, quantize=scheme, verify=verify, calibration=str(calibration))
    artifact = compile_row(row, folder, compile_)
    if artifact is None:
        return row
    report = artifact.quantization or {}
    kept = [layer["node"] for layer in report.get("layers", []) if layer.get("scheme") == "float32"]
    if kept:
        row.note = f"{len(kept)} layers float (stem)"
    return row


def _stage_batches(calibration: Path) -> list[dict[str, np.ndarray]]:
    """The batches kiln's quantize stage calibrates on: the .npz as the stage opens it, minus its held-back share."""
    from passes.quantize.calibration import load_calibration
    from passes.quantize.stage import HOLDOUT

    calib, _ = load_calibration(calibration, SIGNATURE).split(HOLDOUT)
    return list(calib)


def _onnxruntime(work: Path, source: Path, calibration: Path, *, activations: str) -> Row:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = _stage_batches(calibration)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(batches)

        def get_next(self):
            return next(self.feeds, None)

    label = "S8S8" if activations == "int8" else "U8S8"
    prepared = work / "ort-preprocessed.onnx"
    path = work / f"ort-static-{label}.onnx"
    act = QuantType.QInt8 if activations == "int8" else QuantType.QUInt8

    def run() -> None:
        quant_pre_process(str(source), str(prepared))
        quantize_static(str(prepared), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=act, weight_type=QuantType.QInt8)

    _, seconds = timed(run)
    return Row(MODEL, "int8", f"ort quantize_static {label}", path, quantize_s=seconds,
               note="default types" if activations == "int8" else "")


def _logits(path: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"image": images[i : i + 32]})[0] for i in range(0, len(images), 32)])
