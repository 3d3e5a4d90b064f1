"""Structured pruning: what it saves, what it costs in accuracy, and what reconstruction buys back.

Sections:

- ``size``: each model pruned at 30 % (CNNs ``channels=0.3``; MiniLM and the
  LLaMA-style decoder ``hidden=0.3,heads=0.3,ffn=0.3``): parameters and MACs before/after
  (from ``pruning.json``) and onnxruntime CPU latency of the -O1 model before
  and after pruning (1 intra-op thread, runs interleaved between the two,
  median of ``--runs``). The onnx wheel's light CNNs get seeded weights frozen
  in (vgg19 is pruned as shipped, ConstantOfShape fills: 550 MB frozen).
- ``recover``: EfficientNet-Lite0 (real weights) at ``channels=0.2`` on photo
  crops (``tests/image_data.py``: calibration and evaluation splits never share
  a crop), top-1 agreement with the unpruned model; all-MiniLM-L6-v2 at
  ``heads=0.25,ffn=0.2`` on sentences (``tests/text_data.py``, disjoint
  calibration / evaluation slices), mean-pooled embedding cosine with the
  unpruned model; and MiniLM at the 30 % preset (hidden size too: its norms
  then average over fewer channels). Each with plain magnitude pruning (l2)
  and with ``--prune-recover lstsq``, and with ``criterion=activation`` as well.

Run: python bench/prune.py [--sections size,recover] [--runs 30] [--cache DIR] [--models a,b]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LIGHT = ("resnet50", "densenet121", "inception_v1", "inception_v2", "shufflenet", "squeezenet")
MODELS = LIGHT + ("vgg19", "efficientnet_lite0", "minilm", "llama")
TRANSFORMER_30 = "hidden=0.3,heads=0.3,ffn=0.3"


def _source(name: str, cache: Path) -> tuple[Path, str, dict]:
    """(model path, prune spec at 30 %, feeds)."""
    import onnx

    from tests import model_zoo, transformer_models
    from tests.passes.fusion.test_conv_corpus import _feeds

    data = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    if name in LIGHT:
        from tests.e2e.test_fusion_models import frozen_light

        path = frozen_light(name, cache)
        return path, "channels=0.3", _feeds(onnx.load(str(path), load_external_data=False))
    if name == "vgg19":
        path = data / "light_vgg19.onnx"
        proto = onnx.load(str(path))
        init = {t.name for t in proto.graph.initializer}
        return path, "channels=0.3", {k: v for k, v in _feeds(proto).items() if k not in init}
    if name == "efficientnet_lite0":
        return model_zoo.efficientnet_lite0(cache), "channels=0.3", model_zoo.sample_inputs(name)
    if name == "minilm":
        return model_zoo.minilm(cache), TRANSFORMER_30, model_zoo.sample_inputs(name, batch=1, seq=128)
    if name == "llama":
        path = transformer_models.export("llama", opset=model_zoo.OPSET)
        return path, TRANSFORMER_30, transformer_models.make_feeds(1, 128, pad=False)
    raise ValueError(name)


def _session(proto_bytes: bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(proto_bytes, opts, providers=["CPUExecutionProvider"])


def interleaved_ms(models: list[bytes], feeds: dict, runs: int, warmup: int = 3) -> list[float]:
    sessions = [_session(m) for m in models]
    for s in sessions:
        for _ in range(warmup):
            s.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for i, s in enumerate(sessions):
            start = time.perf_counter()
            s.run(None, feeds)
            times[i].append(time.perf_counter() - start)
    return [float(np.median(t)) * 1e3 for t in times]


def section_size(args) -> None:
    import onnx_ir as ir

    from compiler.importers.onnx_file import import_onnx
    from compiler.passes import PassManager, opt_level_pipeline
    from passes.prune import parse_prune, prune_model
    from targets.triple import resolve_target

    spec = resolve_target("x86_64-linux-gnu")
    print(f"\n== size: pruned at 30 % (-O1 before and after), onnxruntime 1 thread, median of {args.runs} interleaved runs")
    print(f"{'model':<20} {'spec':<30} {'params before':>14} {'after':>12} {'-%':>6} {'MACs -%':>8} "
          f"{'ms before':>10} {'ms after':>9} {'speedup':>8} {'prune s':>8}")
    for name in args.models:
        path, text, feeds = _source(name, args.cache)
        model, _ = import_onnx(str(path))
        PassManager(opt_level_pipeline(1)).run(model)
        before = ir.to_proto(model).SerializeToString()
        start = time.perf_counter()
        report = prune_model(model, spec, parse_prune(text))
        PassManager("eliminate-dead").run(model)
        seconds = time.perf_counter() - start
        after = ir.to_proto(model).SerializeToString()
        ms = interleaved_ms([before, after], feeds, args.runs)
        m = report.model
        cut = 100 * (1 - m["params_after"] / m["params_before"])
        macs = 100 * (1 - m["macs_after"] / m["macs_before"])
        extra = ""
        if m["non_embedding_params_before"] != m["params_before"]:
            extra = f"  (non-embedding -{100 * (1 - m['non_embedding_params_after'] / m['non_embedding_params_before']):.1f}%)"
        print(f"{name:<20} {text:<30} {m['params_before']:>14,} {m['params_after']:>12,} {cut:>5.1f}% {macs:>7.1f}% "
              f"{ms[0]:>10.2f} {ms[1]:>9.2f} {ms[0] / ms[1]:>7.2f}x {seconds:>8.1f}{extra}")


def _prune_copy(model_bytes: bytes, text: str, recover: str | None, calibration):
    import onnx_ir as ir

    from compiler.passes import PassManager
    from passes.prune import parse_prune, prune_model
    from passes.quantize.calibration import CalibrationSet
    from targets.triple import resolve_target

    model = ir.from_proto(__import__("onnx").load_from_string(model_bytes))
    cal = CalibrationSet.from_feeds(calibration) if calibration is not None else None
    start = time.perf_counter()
    report = prune_model(model, resolve_target("x86_64-linux-gnu"), parse_prune(text, recover), cal)
    PassManager("eliminate-dead").run(model)
    return ir.to_proto(model).SerializeToString(), report, time.perf_counter() - start


def _outputs(model_bytes: bytes, feeds: list[dict]) -> list[np.ndarray]:
    sess = _session(model_bytes)
    return [sess.run(None, f)[0] for f in feeds]


def section_recover(args) -> None:
    import onnx_ir as ir

    from compiler.importers.onnx_file import import_onnx
    from compiler.passes import PassManager, opt_level_pipeline
    from tests import image_data, model_zoo, text_data

    print("\n== recover: plain magnitude pruning vs least-squares reconstruction (--prune-recover lstsq)")
    print(f"{'model':<20} {'spec':<52} {'recover':<8} {'metric':<16} {'value':>8} {'params -%':>10} {'prune s':>8}")

    # EfficientNet-Lite0, 20 % channels, top-1 agreement on held-out photo crops
    model, _ = import_onnx(str(model_zoo.efficientnet_lite0(args.cache)))
    PassManager(opt_level_pipeline(1)).run(model)
    base = ir.to_proto(model).SerializeToString()
    cal = image_data.feeds(image_data.calibration(args.images), batch=8)
    evaluation = image_data.feeds(image_data.evaluation(args.images), batch=8)
    reference = np.concatenate(_outputs(base, evaluation)).argmax(-1)
    for text in ("channels=0.2,criterion=l2", "channels=0.2,criterion=activation"):
        if args.recover_specs and text not in args.recover_specs:
            continue
        for recover in (None, "lstsq"):
            needs = recover is not None or "activation" in text
            pruned, report, sec = _prune_copy(base, text, recover, cal if needs else None)
            top1 = float((np.concatenate(_outputs(pruned, evaluation)).argmax(-1) == reference).mean())
            m = report.model
            print(f"{'efficientnet_lite0':<20} {text:<52} {recover or 'none':<8} {'top-1 agreement':<16} {top1:>8.4f} "
                  f"{100 * (1 - m['params_after'] / m['params_before']):>9.1f}% {sec:>8.1f}")

    # all-MiniLM-L6-v2, 25 % heads + 20 % FFN, embedding cosine on held-out sentences
    model, _ = import_onnx(str(model_zoo.minilm(args.cache)))
    PassManager(opt_level_pipeline(1)).run(model)
    base = ir.to_proto(model).SerializeToString()
    names = [v.name for v in model.graph.inputs]
    cal = text_data.feeds(args.sentences, batch=16, seq=32, start=0, input_names=names)
    evaluation = text_data.feeds(args.sentences, batch=16, seq=32, start=text_data.HELD_OUT, input_names=names)
    reference = _outputs(base, evaluation)
    for text in ("heads=0.25,ffn=0.2,criterion=l2", "heads=0.25,ffn=0.2,criterion=activation",
                 f"{TRANSFORMER_30},criterion=l2", f"{TRANSFORMER_30},criterion=activation"):
        if args.recover_specs and text not in args.recover_specs:
            continue
        for recover in (None, "lstsq"):
            needs = recover is not None or "activation" in text
            pruned, report, sec = _prune_copy(base, text, recover, cal if needs else None)
            got = _outputs(pruned, evaluation)
            cos = float(np.mean(np.concatenate([text_data.embedding_cosine(r, g, f["attention_mask"])
                                                for r, g, f in zip(reference, got, evaluation)])))
            m = report.model
            print(f"{'minilm':<20} {text:<52} {recover or 'none':<8} {'embedding cos':<16} {cos:>8.4f} "
                  f"{100 * (1 - m['params_after'] / m['params_before']):>9.1f}% {sec:>8.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="size,recover")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--images", type=int, default=96, help="calibration and evaluation images each")
    parser.add_argument("--sentences", type=int, default=256, help="calibration and evaluation sentences each")
    parser.add_argument("--recover-specs", default="", help="';'-separated specs of the recover section (default: all)")
    parser.add_argument("--cache", type=Path, default=None, help="folder for model exports (default: a temp folder)")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.recover_specs = [t for t in args.recover_specs.split(";") if t]
    args.cache = args.cache or Path(tempfile.mkdtemp(prefix="kiln-prune-bench-"))
    args.cache.mkdir(parents=True, exist_ok=True)
    for section in args.sections.split(","):
        {"size": section_size, "recover": section_recover}[section](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
