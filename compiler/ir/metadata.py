"""Model metadata that survives passes: source format, architecture, tokenizer, provenance.

Stored as one JSON entry in the model's ``metadata_props`` (passes never touch
model-level properties), so it travels into emitted ONNX files too. Nothing in
it depends on time or on absolute paths: identical inputs give identical bytes.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import onnx_ir as ir

KEY = "kiln.metadata"


@dataclasses.dataclass
class ModelMetadata:
    source_format: str = "onnx"
    source_sha256: str | None = None
    architecture: dict[str, Any] = dataclasses.field(default_factory=dict)
    tokenizer: dict[str, Any] = dataclasses.field(default_factory=dict)
    provenance: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def get_metadata(model: ir.Model) -> ModelMetadata:
    text = model.metadata_props.get(KEY)
    if not text:
        return ModelMetadata()
    return ModelMetadata(**json.loads(text))


def set_metadata(model: ir.Model, meta: ModelMetadata) -> None:
    model.metadata_props[KEY] = meta.to_json()
