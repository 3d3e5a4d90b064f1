"""Run an ONNX artifact with onnxruntime."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import ArtifactError


class OrtRunner:
    def __init__(self, model_path: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(model_path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:
            raise ArtifactError(f"{model_path}: onnxruntime cannot load it: {_first_line(err)}") from None
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self.session.run(self.output_names, dict(inputs))
        except Exception as err:
            raise ArtifactError(f"onnxruntime failed to run the model: {_first_line(err)}") from None
        return dict(zip(self.output_names, values))


def load(artifact_dir: Path, manifest: dict[str, Any]) -> OrtRunner:
    return OrtRunner(artifact_dir / manifest["entry"])


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__
