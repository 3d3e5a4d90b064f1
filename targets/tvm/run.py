"""Run a TVM artifact on this host with the Relax VM (and shared helpers for the other runners)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import ArtifactError
from targets.tvm import _env, params


def ordered_inputs(inputs: Mapping[str, np.ndarray], names: Sequence[str]) -> list[np.ndarray]:
    missing = [n for n in names if n not in inputs]
    if missing:
        raise ArtifactError(f"missing input(s) {', '.join(missing)}")
    return [np.ascontiguousarray(inputs[n]) for n in names]


def flatten_outputs(result: Any) -> list[Any]:
    """The VM's result (a tensor or a nested tuple of tensors) as a flat list."""
    if hasattr(result, "numpy"):
        return [result]
    flat: list[Any] = []
    for item in result:
        flat.extend(flatten_outputs(item))
    return flat


def name_outputs(values: Sequence[np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    if len(values) != len(names):
        raise ArtifactError(f"the library returned {len(values)} output(s); the signature has {len(names)}")
    return dict(zip(names, values))


class HostRunner:
    """``lib.so`` (or a host ``lib.tar``) loaded into this process and run by the Relax VM on the CPU."""

    def __init__(self, artifact_dir: Path, manifest: dict[str, Any]) -> None:
        tvm = _env.tvm()
        from tvm import relax

        backend = manifest["backend"]
        self.input_names = list(backend["inputs"])
        self.output_names = [o["name"] for o in manifest["signature"]["outputs"]]
        self.device = tvm.cpu()
        lib_path = artifact_dir / manifest["entry"]
        try:
            lib = tvm.runtime.load_module(str(lib_path))
            self.vm = relax.VirtualMachine(lib, self.device)
        except Exception as err:
            raise ArtifactError(f"{lib_path}: the TVM runtime cannot load it: {_first_line(err)}") from None
        names = backend["params"].get("names", [])
        self.params = params.read(artifact_dir, names, self.device) if names else []
        self.main = self.vm["main"]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        tvm = _env.tvm()
        args = [tvm.runtime.tensor(x, self.device) for x in ordered_inputs(inputs, self.input_names)]
        try:
            result = self.main(*args, *self.params)
        except Exception as err:
            raise ArtifactError(f"the TVM VM failed to run the model: {_first_line(err)}") from None
        return name_outputs([t.numpy() for t in flatten_outputs(result)], self.output_names)


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(err).__name__
