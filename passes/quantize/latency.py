"""Is the quantized artifact faster than float here? A short interleaved onnxruntime timing.

Only when the artifact's target is this host's architecture (otherwise the
figure would say nothing about the device). Timings are never written into
artifact files (they vary run to run); the driver prints them and warns when
the quantized model is slower.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

_ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}
#: seconds of timing per model, at most
BUDGET_S = 1.5
MAX_RUNS = 50


def runs_here(spec: Any) -> bool:
    host = _ARCH_ALIASES.get(platform.machine().lower(), platform.machine().lower())
    arch, _, rest = spec.triple.partition("-")
    return spec.device == "cpu" and arch == host and platform.system() == "Linux" and "linux" in rest


def compare_latency(float_model: onnx.ModelProto, artifact_model: Path) -> dict[str, float] | None:
    """Median ms of one run for the float model and the artifact (1 thread, runs interleaved)."""
    import onnxruntime as ort

    from compiler.errors import KilnError
    from compiler.signature import random_inputs

    def open_session(model: Any):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 4
        return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])

    try:
        sessions = [open_session(float_model.SerializeToString()), open_session(str(artifact_model))]
        sig = [{"name": i.name, "dtype": _np_dtype(i.type), "shape": [d if isinstance(d, int) else None for d in i.shape]}
               for i in sessions[1].get_inputs()]
        feed = random_inputs(sig, seed=0)
        for sess in sessions:
            sess.run(None, feed)
    except (KilnError, Exception):  # noqa: BLE001 - timing is advisory; a failure here is not the user's problem
        return None
    times: list[list[float]] = [[], []]
    deadline = time.perf_counter() + 2 * BUDGET_S
    for _ in range(MAX_RUNS):
        for i, sess in enumerate(sessions):
            start = time.perf_counter()
            sess.run(None, feed)
            times[i].append(time.perf_counter() - start)
        if time.perf_counter() > deadline and len(times[0]) >= 5:
            break
    return {"float32": float(np.median(times[0])) * 1e3, "quantized": float(np.median(times[1])) * 1e3}


def _np_dtype(ort_type: str) -> str:
    name = ort_type.removeprefix("tensor(").removesuffix(")")
    return {"float": "float32", "double": "float64"}.get(name, name)
