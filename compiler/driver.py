"""compile(): import → passes → legalize → emit → verify → manifest, built atomically."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

import compiler
from compiler import artifact as artifact_io
from compiler.compare import compare_outputs, compare_outputs_relative, max_abs_error
from compiler.errors import KilnError, TargetError, UnsupportedError, VerificationError
from compiler.importers import import_source
from compiler.importers.checkpoint import Checkpoint
from compiler.passes import PassManager, PassRecord, PipelineReport, opt_level_pipeline, parse_pipeline
from compiler.progress import Progress
from compiler.signature import random_inputs, signature

#: Ops whose outputs differ run to run: artifacts containing them cannot be checked by comparison.
NONDETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
)
VERIFY_RTOL = 1e-3
VERIFY_ATOL = 1e-5
#: A quantized artifact is checked against its quantized IR run without onnxruntime's graph
#: optimizations (the exact meaning of the QDQ graph). onnxruntime's integer kernels (QLinearConv,
#: MatMulNBits at accuracy level 4) round differently from that float emulation by up to a step
#: here and there, so the check is a relative L2 error, not elementwise.
VERIFY_QUANTIZED_RELATIVE_L2 = 0.02


@dataclasses.dataclass
class CompileOptions:
    target: str = "x86_64-linux-gnu"
    device: str | None = None
    emit: str = "onnx"
    opt_level: int = 1
    passes: str | None = None
    verify: bool = True
    dump_ir: str | os.PathLike | None = None
    seed: int = 0
    quiet: bool = True
    emit_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: quantization scheme spec (``int8``, ``w4{block-size=64}``, ...) or None
    quantize: str | None = None
    #: calibration data: a path, a passes.quantize.calibration.CalibrationSet, or a list of input feeds
    calibration: Any = None
    calibration_preprocess: str | None = None
    accuracy_budget: str | None = None
    #: node names never quantized
    keep_float: tuple[str, ...] = ()
    #: structured pruning spec (``channels=0.3,heads=0.25,ffn=0.2,criterion=l2``) or None
    prune: str | None = None
    #: reconstruction after pruning: ``lstsq`` or None
    prune_recover: str | None = None


@dataclasses.dataclass
class CompileResult:
    path: Path
    manifest: dict[str, Any]
    report: PipelineReport
    quantization: Any = None  # passes.quantize.stage.QuantReport when --quantize
    pruning: Any = None  # passes.prune.stage.PruneReport when --prune


def compile_model(
    source: Any, output: str | os.PathLike, options: CompileOptions, log: Callable[[str], None] | None = None
) -> CompileResult:
    from targets import available_emits, get_backend
    from targets.triple import resolve_target

    say = log or (lambda _msg: None)
    spec = resolve_target(options.target, options.device)
    if options.emit not in spec.emit:
        installed = [e for e in spec.emit if e in available_emits()]
        missing = [e for e in spec.emit if e not in installed]
        raise TargetError(
            f"target {spec.name!r} (device {spec.device}) does not support --emit {options.emit}",
            hint=f"it supports: {', '.join(installed) or 'none of the installed backends'}"
            + (f" (and {', '.join(missing)}, whose backends this kiln does not have yet)" if missing else ""),
        )
    backend = get_backend(options.emit)
    steps = parse_pipeline(_pipeline_for(options, spec))
    quant = _QuantRequest.parse(options)
    prune = _PruneRequest.parse(options)
    out = Path(output)

    with artifact_io.staging(out) as tmp:
        model, digest = import_source(source)
        source_format = "onnx"
        if isinstance(model, Checkpoint) and getattr(backend, "emit_checkpoint", None) is None:
            # graph backends (onnx, tvm): the checkpoint becomes the architecture's graph, then the normal pipeline
            from compiler.importers.checkpoint_graph import build_graph

            say(f"imported {_label(source)}: {model.arch}, {len(model.tensors)} tensors ({model.source_format})")
            source_format, model = model.source_format, build_graph(model, options.emit)
            source = model  # the reference for verification is the built graph, serialized before the passes
        if isinstance(model, Checkpoint) and prune is not None:
            raise UnsupportedError("--prune works on graph models; this checkpoint has no graph to prune")
        if isinstance(model, Checkpoint):  # an LLM checkpoint: no graph pipeline, the runtime brings its graph
            result = _compile_checkpoint(model, digest, backend, spec, quant, options, out, tmp, say)
            artifact_io.write_manifest(tmp, result.manifest)
            return result
        say(f"imported {_label(source)}: {sum(1 for _ in model.graph)} nodes")
        reference, why_not = _reference_for(source, model) if options.verify else (None, "disabled (--no-verify)")
        sig_before = signature(model)

        progress = Progress("optimizing", _count_passes(steps), quiet=options.quiet)

        def on_pass(record: PassRecord) -> None:
            progress.update(1, record.name)

        with progress:
            report = PassManager(steps, dump_ir=options.dump_ir, on_pass=on_pass).run(model)
        sig_after = signature(model)
        if sig_after["inputs"] != sig_before["inputs"] or [o["name"] for o in sig_after["outputs"]] != [
            o["name"] for o in sig_before["outputs"]
        ]:
            raise VerificationError("the pipeline changed the model's input/output signature")

        quant_report = float_snapshot = prune_report = None
        against = "the source model"
        if prune is not None:  # pruning changes what the model computes: verify against the pruned IR
            prune_report, pruned_reference = prune.run(model, spec, options, say)
            if reference is not None:
                reference, against = pruned_reference, "the pruned model before emit"
                why_not = "the pruned model is over 2 GB; compile from a file to verify"
            if signature(model)["inputs"] != sig_before["inputs"]:
                raise VerificationError(f"--prune {prune.options.spec()} changed the model's inputs")
            sig_after = signature(model)
        if quant is not None:
            quant_report, quantized_reference, float_snapshot = quant.run(model, spec, options, say)
            if reference is not None:  # the artifact must compute what the quantized IR computes
                reference, against = quantized_reference, "the quantized model before encoding"
                why_not = "the quantized model is over 2 GB; compile from a file to verify"

            if signature(model)["inputs"] != sig_before["inputs"]:
                raise VerificationError(f"--quantize {quant.scheme.spec()} changed the model's inputs")
            sig_after = signature(model)

        problems = backend.legalize(model, spec)
        if problems:
            raise UnsupportedError(
                f"{len(problems)} problem(s) stop --emit {options.emit} for {spec.name}: {problems[0]}",
                hint="\n".join(problems[:50]) + (f"\n... and {len(problems) - 50} more" if len(problems) > 50 else ""),
            )
        result = backend.emit(model, spec, tmp, options.emit_options)
        manifest: dict[str, Any] = {
            "schema": artifact_io.SCHEMA_VERSION,
            "kiln_version": compiler.__version__,
            "emit": options.emit,
            "entry": result.entry,
            "source": {"format": source_format, "sha256": digest},
            "target": spec.to_json(),
            "pipeline": {"spec": report.pipeline, "passes": [r.to_json() for r in report.records]},
            "signature": sig_after,
            "files": artifact_io.describe_files(tmp, result.files),
            **({"backend": result.extra} if result.extra else {}),
        }
        if prune_report is not None:
            manifest["pruning"] = prune.write_report(tmp, prune_report, manifest)
        if quant_report is not None:
            manifest["quantization"] = quant.write_report(tmp, quant_report, manifest)
        manifest["verification"] = (
            _verify(backend, tmp, manifest, reference, sig_before, options.seed, against, quantized=quant is not None)
            if reference is not None
            else {"skipped": why_not}
        )
        if quant_report is not None and float_snapshot is not None:
            quant.check_latency(quant_report, float_snapshot, tmp / result.entry, spec, say)
        artifact_io.write_manifest(tmp, manifest)
    say(f"wrote {out}")
    return CompileResult(Path(os.path.abspath(out)), manifest, report, quant_report, prune_report)


def _compile_checkpoint(ck: Checkpoint, digest: str, backend: Any, spec: Any, quant: Any,
                        options: CompileOptions, out: Path, tmp: Path, say: Callable[[str], None]) -> CompileResult:
    """Checkpoint -> artifact: the backend converts (and quantizes) tensor by tensor and verifies by running
    the file. The graph passes and the quantize stage do not apply: llama.cpp-style runtimes bring their own
    graph, and GGUF quantization is an encoding the backend does while streaming (never a float copy)."""
    convert = getattr(backend, "emit_checkpoint", None)
    if convert is None:
        raise UnsupportedError(f"--emit {options.emit} does not take LLM checkpoints yet", hint="use --emit gguf")
    calibrates = getattr(backend, "checkpoint_calibration", False)  # gguf: text for an importance matrix
    if (options.calibration is not None and not calibrates) or options.accuracy_budget or options.keep_float:
        raise UnsupportedError("--calibration, --accuracy-budget and --keep-float do not apply to checkpoint conversion"
                               + (f" for --emit {options.emit}" if options.calibration is not None else ""))
    say(f"imported {_label(ck.path)}: {ck.arch}, {len(ck.tensors)} tensors ({ck.source_format})")
    calibration = ({"calibration": options.calibration, "quiet": options.quiet}
                   if options.calibration is not None else {})
    result, info = convert(ck, spec, tmp, quant.scheme if quant is not None else None, say, **calibration)
    manifest: dict[str, Any] = {
        "schema": artifact_io.SCHEMA_VERSION,
        "kiln_version": compiler.__version__,
        "emit": options.emit,
        "entry": result.entry,
        "source": {"format": ck.source_format, "sha256": digest},
        "target": spec.to_json(),
        "pipeline": {"spec": "", "passes": []},
        "signature": info["signature"],
        "files": artifact_io.describe_files(tmp, result.files),
        **({"backend": result.extra} if result.extra else {}),
        **({"quantization": info["quantization"]} if "quantization" in info else {}),
    }
    manifest["verification"] = (backend.verify_checkpoint(tmp, manifest, options.seed) if options.verify
                                else {"skipped": "disabled (--no-verify)"})
    say(f"wrote {out}")
    return CompileResult(Path(os.path.abspath(out)), manifest, PipelineReport(""))


def _pipeline_for(options: CompileOptions, spec: Any) -> str:
    """--passes as given, else the -O pipeline for this target: onnxruntime
    contrib fusions only when the artifact runs on an onnxruntime that has them."""
    if options.passes is not None:
        return options.passes
    contrib = options.emit == "onnx" and spec.onnx_runtime_contrib
    level = options.opt_level
    if options.quantize and level > 2:
        # contrib fusions (FusedConv, Attention, SkipLayerNorm) hide the MatMul/Conv
        # weights and activations that quantization rewrites: quantized compiles stop at -O2.
        level = 2
    pipeline = opt_level_pipeline(level, contrib=contrib, gpu=spec.device != "cpu")
    if options.quantize and _int4_scheme(options.quantize):
        # folding a norm's gain into the next weight gives int4 blocks the norm's salient
        # channels to carry (measured: logits cosine 0.876 at -O2 vs 0.900 without the fold)
        pipeline = pipeline.replace("fold-scale-into-weights,", "")
    return pipeline


def _int4_scheme(text: str) -> bool:
    from passes.quantize.schemes import parse_scheme

    try:
        return getattr(parse_scheme(text), "bits", 0) == 4
    except KilnError:
        return False  # reported when the quantize request is parsed


def _label(source: Any) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__


def _count_passes(steps: list) -> int | None:
    from compiler.passes import Fixpoint

    return None if any(isinstance(s, Fixpoint) for s in steps) else len(steps)


def _reference_for(source: Any, model: ir.Model) -> tuple[Any, str]:
    """What onnxruntime runs as the reference (the source file, or the source serialized), or why none."""
    if any(node.op_type in NONDETERMINISTIC_OPS for node in ir.traversal.RecursiveGraphIterator(model.graph)):
        return None, "the model has random ops; runs cannot be compared"
    if isinstance(source, (str, os.PathLike)):
        return str(source), ""
    if isinstance(source, ir.Model) and _initializer_bytes(model) > (1 << 31) - 1:  # before serializing it all
        return None, "the model built in memory is over 2 GB, more than one protobuf holds for the reference run"
    proto = source if isinstance(source, onnx.ModelProto) else ir.to_proto(model)
    if proto.ByteSize() > (1 << 31) - 1:
        return None, "the in-memory model is over 2 GB; compile from a file to verify"
    return proto.SerializeToString(), ""


def _initializer_bytes(model: ir.Model) -> int:
    """Initializer bytes from shapes and dtypes (lazily read weights stay unread)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _verify(backend: Any, folder: Path, manifest: dict, reference: Any, sig: dict, seed: int,
            against: str = "the source model", quantized: bool = False) -> dict[str, Any]:
    """Run the artifact and the source model on the same seeded inputs and compare."""
    import onnxruntime as ort

    # a backend may know its artifact cannot run here (another architecture, a GPU this host lacks)
    why_not = backend.cannot_verify(folder, manifest) if hasattr(backend, "cannot_verify") else None
    if why_not:
        return {"skipped": why_not}

    try:
        inputs = random_inputs(sig["inputs"], seed=seed)
    except KilnError as err:
        return {"skipped": f"no random inputs: {err}"}
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        if quantized:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(reference, opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        expected = dict(zip(names, session.run(names, inputs)))
    except Exception as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        return {"skipped": f"onnxruntime cannot run {against} on random inputs: {first}"}
    runner = backend.load(folder, manifest)
    actual = runner.run(inputs)
    if quantized:
        problems = compare_outputs_relative(expected, actual, VERIFY_QUANTIZED_RELATIVE_L2)
    else:
        problems = compare_outputs(expected, actual, VERIFY_RTOL, VERIFY_ATOL)
    if problems:
        raise VerificationError(
            f"the compiled artifact does not compute what the model computes: {problems[0]}",
            hint="rerun with --dump-ir DIR to see which pass changed the result, or --passes to bisect",
        )
    tolerance = ({"relative_l2": VERIFY_QUANTIZED_RELATIVE_L2} if quantized
                 else {"rtol": VERIFY_RTOL, "atol": VERIFY_ATOL})
    return {
        "method": f"onnxruntime on {against} vs the artifact",
        "inputs": f"seeded random (seed {seed})",
        "max_abs_error": max_abs_error(expected, actual),
        **tolerance,
        "passed": True,
    }


#: passes run after quantizing: drop what the scheme left unused (never fold: that would re-expand weights)
POST_QUANTIZE_PIPELINE = "eliminate-dead"
#: a quantized artifact this much slower than float in onnxruntime here gets a warning
SLOWER_TOLERANCE = 1.05


@dataclasses.dataclass
class _QuantRequest:
    """The --quantize part of a compile: parsed early (bad options fail before any work), run after the passes."""

    scheme: Any
    budget: Any

    @classmethod
    def parse(cls, options: CompileOptions) -> _QuantRequest | None:
        if not options.quantize:
            if (options.calibration is not None and not options.prune) or options.accuracy_budget:
                raise KilnError("--calibration and --accuracy-budget only apply with --quantize SCHEME"
                                + (" (or --prune SPEC for --calibration)" if options.calibration is not None else ""))
            return None
        from passes.quantize.schemes import parse_scheme
        from passes.quantize.stage import parse_budget

        return cls(parse_scheme(options.quantize),
                   parse_budget(options.accuracy_budget) if options.accuracy_budget else None)

    def run(self, model: ir.Model, spec: Any, options: CompileOptions, say: Callable[[str], None]):
        from passes.quantize.stage import IN_MEMORY_LIMIT, _weight_bytes, quantize_model

        calibration = self._calibration(model, options)
        float_snapshot = ir.to_proto(model) if _weight_bytes(model) <= IN_MEMORY_LIMIT else None
        report = quantize_model(model, self.scheme, spec, calibration=calibration, budget=self.budget,
                                exclude=options.keep_float, quiet=options.quiet, log=say)
        PassManager(POST_QUANTIZE_PIPELINE).run(model)
        for line in report.summary():
            say(line)
        reference = None
        if options.verify:
            proto = ir.to_proto(model)
            reference = proto.SerializeToString() if proto.ByteSize() < (1 << 31) - 1 else None
        return report, reference, float_snapshot

    @staticmethod
    def _calibration(model: ir.Model, options: CompileOptions) -> Any:
        from passes.quantize.calibration import CalibrationSet, load_calibration

        data = options.calibration
        if data is None or isinstance(data, CalibrationSet):
            return data
        if isinstance(data, (str, os.PathLike)):
            return load_calibration(data, signature(model)["inputs"], preprocess=options.calibration_preprocess)
        if isinstance(data, (list, tuple)):
            return CalibrationSet.from_feeds(list(data))
        raise KilnError(f"calibration must be a path, a CalibrationSet or a list of input dicts, not {type(data).__name__}")

    def write_report(self, folder: Path, report: Any, manifest: dict[str, Any]) -> dict[str, Any]:
        import json

        name = "quantization.json"
        (folder / name).write_text(json.dumps(report.to_json(), indent=1, sort_keys=False) + "\n")
        manifest["files"].extend(artifact_io.describe_files(folder, [name]))
        summary = report.to_json()["model"]
        return {"scheme": report.scheme, "report": name, "size_ratio": summary["size_ratio"],
                "metrics": summary["metrics"]}

    def check_latency(self, report: Any, float_proto: onnx.ModelProto, artifact_model: Path, spec: Any,
                      say: Callable[[str], None]) -> None:
        """Time float vs quantized in onnxruntime when the artifact runs on this host; warn when slower."""
        from passes.quantize.latency import compare_latency, runs_here

        if not runs_here(spec) or artifact_model.suffix != ".onnx":
            return
        timings = compare_latency(float_proto, artifact_model)
        if timings is None:
            return
        report.latency_ms = timings
        ratio = timings["quantized"] / timings["float32"]
        if ratio > SLOWER_TOLERANCE:
            report.warnings.append(
                f"the {self.scheme.spec()} artifact runs {ratio:.2f}x slower than float32 in onnxruntime on this host "
                f"({timings['quantized']:.2f} ms vs {timings['float32']:.2f} ms); it saves size, not time")


#: passes run after pruning: drop the weights and shape constants the rewrite replaced
POST_PRUNE_PIPELINE = "eliminate-dead"


@dataclasses.dataclass
class _PruneRequest:
    """The --prune part of a compile: parsed early, run after the -O pipeline and before quantization."""

    options: Any  # passes.prune.options.PruneOptions

    @classmethod
    def parse(cls, options: CompileOptions) -> _PruneRequest | None:
        if not options.prune:
            if options.prune_recover:
                raise KilnError("--prune-recover only applies with --prune SPEC")
            return None
        from passes.prune import parse_prune

        return cls(parse_prune(options.prune, options.prune_recover))

    def run(self, model: ir.Model, spec: Any, options: CompileOptions, say: Callable[[str], None]):
        from passes.prune import prune_model

        calibration = _QuantRequest._calibration(model, options)  # --calibration is shared with quantization
        report = prune_model(model, spec, self.options, calibration, quiet=options.quiet, log=say)
        PassManager(POST_PRUNE_PIPELINE).run(model)
        reference = None
        if options.verify:
            proto = ir.to_proto(model)
            reference = proto.SerializeToString() if proto.ByteSize() < (1 << 31) - 1 else None
        return report, reference

    def write_report(self, folder: Path, report: Any, manifest: dict[str, Any]) -> dict[str, Any]:
        import json

        name = "pruning.json"
        (folder / name).write_text(json.dumps(report.to_json(), indent=1, sort_keys=False) + "\n")
        manifest["files"].extend(artifact_io.describe_files(folder, [name]))
        summary = report.model
        return {"spec": report.spec, "report": name,
                **{k: summary[k] for k in ("params_before", "params_after", "macs_before", "macs_after")}}
