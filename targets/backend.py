"""Types shared by every emit backend."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np


@dataclasses.dataclass
class EmitResult:
    """What a backend wrote: file names relative to the artifact folder, and manifest extras."""

    files: list[str]
    entry: str
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


class Runner(Protocol):
    """Runs an artifact on this host: named numpy inputs in, named outputs out."""

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...
