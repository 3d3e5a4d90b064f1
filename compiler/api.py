"""The Python API for build scripts: ``compile(...) -> Artifact`` and ``load_artifact(path)``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from compiler import artifact as artifact_io
from compiler.driver import CompileOptions, compile_model
from compiler.passes import PipelineReport
from compiler.signature import check_inputs, random_inputs


class Artifact:
    """A compiled artifact folder: its manifest, and a way to run it on this host."""

    def __init__(self, path: str | os.PathLike, manifest: dict[str, Any] | None = None,
                 report: PipelineReport | None = None, quantization: Any = None) -> None:
        self.path = Path(path)
        self.manifest = manifest if manifest is not None else artifact_io.read_manifest(self.path)
        #: per-pass timings of the compile that made it (None when loaded from disk)
        self.report = report
        self._quantization = quantization

    @property
    def quantization(self) -> dict[str, Any] | None:
        """The quantization report (``quantization.json``), or None for an unquantized artifact."""
        info = self.manifest.get("quantization")
        if info is None:
            return None
        import json

        return json.loads((self.path / info["report"]).read_text())

    @property
    def pruning(self) -> dict[str, Any] | None:
        """The pruning report (``pruning.json``), or None for an unpruned artifact."""
        info = self.manifest.get("pruning")
        if info is None:
            return None
        import json

        return json.loads((self.path / info["report"]).read_text())

    @property
    def quantization_latency_ms(self) -> dict[str, float] | None:
        """float32 vs quantized onnxruntime latency measured at compile time (when it ran on this host)."""
        return None if self._quantization is None else self._quantization.latency_ms

    def __repr__(self) -> str:
        return f"Artifact({str(self.path)!r}, emit={self.manifest['emit']!r}, target={self.manifest['target']['name']!r})"

    @property
    def inputs(self) -> list[dict[str, Any]]:
        return self.manifest["signature"]["inputs"]

    @property
    def outputs(self) -> list[dict[str, Any]]:
        return self.manifest["signature"]["outputs"]

    def check(self) -> None:
        """Raise ArtifactError when a file is missing or differs from its manifest hash."""
        artifact_io.check_files(self.path, self.manifest)

    @cached_property
    def _runner(self) -> Any:
        from targets import get_backend

        self.check()
        return get_backend(self.manifest["emit"]).load(self.path, self.manifest)

    def random_inputs(self, seed: int = 0, dims: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
        return random_inputs(self.inputs, seed=seed, dims=dims)

    def run(self, inputs: Mapping[str, np.ndarray] | None = None, *, seed: int = 0) -> dict[str, np.ndarray]:
        """Run on this host; inputs and outputs are keyed by tensor name (seeded random inputs when None)."""
        if inputs is None:
            inputs = self.random_inputs(seed)
        checked = check_inputs(inputs, self.inputs, str(self.path))
        return self._runner.run(checked)


def compile(
    model: Any,
    *,
    target: str = "x86_64-linux-gnu",
    emit: str = "onnx",
    output: str | os.PathLike,
    device: str | None = None,
    opt_level: int = 1,
    passes: str | None = None,
    verify: bool = True,
    dump_ir: str | os.PathLike | None = None,
    quiet: bool = True,
    quantize: str | None = None,
    calibration: Any = None,
    calibration_preprocess: str | None = None,
    accuracy_budget: str | None = None,
    keep_float: tuple[str, ...] | list[str] = (),
    prune: str | None = None,
    prune_recover: str | None = None,
    **emit_options: Any,
) -> Artifact:
    """Compile ``model`` (a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model``) into ``output``.

    ``passes`` (a pipeline string) replaces the ``opt_level`` pipeline when given.
    ``quantize`` names a scheme (``w8``, ``w4{block-size=64}``, ``int8``, ``int8-dynamic``,
    ``fp16``, ``bf16``, ``gptq-w4``, ``awq-w4``); ``calibration`` is a path (.npz, a folder of
    .npz/.npy, a folder of images), a ``CalibrationSet`` or a list of input dicts (for ``emit="gguf"``
    from an LLM checkpoint: a text file or folder of .txt, from which the importance matrix is computed);
    ``accuracy_budget`` is e.g. ``"cosine>=0.99"``; ``keep_float`` names nodes never quantized.
    ``prune`` is a structured-pruning spec (``"channels=0.3,heads=0.25,ffn=0.2,hidden=0.2,criterion=l2"``),
    applied after the ``opt_level`` pipeline and before quantization; ``prune_recover="lstsq"``
    refits the layers after each cut on ``calibration``.
    Raises a ``compiler.errors.KilnError`` subclass on bad input; nothing is left
    at ``output`` when it fails.
    """
    options = CompileOptions(
        target=target, device=device, emit=emit, opt_level=opt_level, passes=passes,
        verify=verify, dump_ir=dump_ir, quiet=quiet, emit_options=dict(emit_options),
        quantize=quantize, calibration=calibration, calibration_preprocess=calibration_preprocess,
        accuracy_budget=accuracy_budget, keep_float=tuple(keep_float),
        prune=prune, prune_recover=prune_recover,
    )
    result = compile_model(model, output, options)
    return Artifact(result.path, result.manifest, result.report, result.quantization)


def load_artifact(path: str | os.PathLike) -> Artifact:
    return Artifact(path)
