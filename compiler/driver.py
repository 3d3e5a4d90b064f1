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
from compiler.compare import compare_outputs, max_abs_error
from compiler.errors import KilnError, TargetError, UnsupportedError, VerificationError
from compiler.importers.onnx_file import import_onnx
from compiler.passes import PassManager, PassRecord, PipelineReport, opt_level_pipeline, parse_pipeline
from compiler.progress import Progress
from compiler.signature import random_inputs, signature

#: Ops whose outputs differ run to run: artifacts containing them cannot be checked by comparison.
NONDETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
)
VERIFY_RTOL = 1e-3
VERIFY_ATOL = 1e-5


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


@dataclasses.dataclass
class CompileResult:
    path: Path
    manifest: dict[str, Any]
    report: PipelineReport


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
    out = Path(output)

    with artifact_io.staging(out) as tmp:
        model, digest = import_onnx(source)
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
            "source": {"format": "onnx", "sha256": digest},
            "target": spec.to_json(),
            "pipeline": {"spec": report.pipeline, "passes": [r.to_json() for r in report.records]},
            "signature": sig_after,
            "files": artifact_io.describe_files(tmp, result.files),
            **({"backend": result.extra} if result.extra else {}),
        }
        manifest["verification"] = (
            _verify(backend, tmp, manifest, reference, sig_before, options.seed)
            if reference is not None
            else {"skipped": why_not}
        )
        artifact_io.write_manifest(tmp, manifest)
    say(f"wrote {out}")
    return CompileResult(Path(os.path.abspath(out)), manifest, report)


def _pipeline_for(options: CompileOptions, spec: Any) -> str:
    """--passes as given, else the -O pipeline for this target: onnxruntime
    contrib fusions only when the artifact runs on an onnxruntime that has them."""
    if options.passes is not None:
        return options.passes
    contrib = options.emit == "onnx" and spec.onnx_runtime_contrib
    return opt_level_pipeline(options.opt_level, contrib=contrib, gpu=spec.device != "cpu")


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
    proto = source if isinstance(source, onnx.ModelProto) else ir.to_proto(model)
    if proto.ByteSize() > (1 << 31) - 1:
        return None, "the in-memory model is over 2 GB; compile from a file to verify"
    return proto.SerializeToString(), ""


def _verify(backend: Any, folder: Path, manifest: dict, reference: Any, sig: dict, seed: int) -> dict[str, Any]:
    """Run the artifact and the source model on the same seeded inputs and compare."""
    import onnxruntime as ort

    try:
        inputs = random_inputs(sig["inputs"], seed=seed)
    except KilnError as err:
        return {"skipped": f"no random inputs: {err}"}
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        session = ort.InferenceSession(reference, opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        expected = dict(zip(names, session.run(names, inputs)))
    except Exception as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        return {"skipped": f"onnxruntime cannot run the source model on random inputs: {first}"}
    runner = backend.load(folder, manifest)
    actual = runner.run(inputs)
    problems = compare_outputs(expected, actual, VERIFY_RTOL, VERIFY_ATOL)
    if problems:
        raise VerificationError(
            f"the compiled artifact does not compute what the model computes: {problems[0]}",
            hint="rerun with --dump-ir DIR to see which pass changed the result, or --passes to bisect",
        )
    return {
        "method": "onnxruntime on the source model vs the artifact",
        "inputs": f"seeded random (seed {seed})",
        "max_abs_error": max_abs_error(expected, actual),
        "rtol": VERIFY_RTOL,
        "atol": VERIFY_ATOL,
        "passed": True,
    }
