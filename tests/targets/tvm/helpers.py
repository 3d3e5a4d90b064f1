"""Shared helpers of the TVM backend tests: run artifacts through the CLI, reference runs in onnxruntime."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[3]
#: the issue's bar: fp32 artifacts match onnxruntime on the original model elementwise
RTOL, ATOL = 1e-3, 1e-4


def kiln(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """The CLI as a user runs it (a fresh interpreter)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "compiler.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def kiln_run(artifact: Path, inputs: dict[str, np.ndarray], tmp: Path, *extra: str) -> dict[str, np.ndarray]:
    """``kiln run ARTIFACT --inputs in.npz -o out.npz [extra]`` and the outputs it wrote."""
    feeds, out = tmp / "in.npz", tmp / "out.npz"
    np.savez(feeds, **inputs)
    proc = kiln("run", str(artifact), "--inputs", str(feeds), "-o", str(out), *extra)
    assert proc.returncode == 0, proc.stderr
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


def ort_run(model: Any, inputs: dict[str, np.ndarray], *, optimize: bool = True) -> dict[str, np.ndarray]:
    """onnxruntime on a model file / bytes (the reference)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = str(model) if isinstance(model, Path) else model
    session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs)))


def assert_matches(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray], rtol: float = RTOL,
                   atol: float = ATOL) -> None:
    assert list(actual) == list(expected)
    for name, value in expected.items():
        assert actual[name].shape == value.shape, name
        assert actual[name].dtype == value.dtype, name
        np.testing.assert_allclose(actual[name], value, rtol=rtol, atol=atol, err_msg=name)


def elf_machine(path: Path) -> int:
    """e_machine of an ELF file, parsed here (not with the code under test)."""
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
