"""The conformance corpus: every model shipped in the onnx wheel's test data plus
the node cases that ``onnx.backend.test.loader`` builds in memory.

Each case runs in onnxruntime on the original; the cases onnxruntime runs (and
runs deterministically) are compiled by kiln and the artifact's outputs are
compared with the original's.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
FILE_GROUPS = ("pytorch-converted", "pytorch-operator", "simple")


@dataclasses.dataclass
class Case:
    group: str
    name: str
    model: Any  # a path or an onnx.ModelProto
    inputs: dict[str, Any]


def _data_inputs(proto: onnx.ModelProto) -> list[str]:
    initializers = {i.name for i in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in initializers]


def _to_value(x: Any) -> Any:
    if isinstance(x, onnx.TensorProto):
        return numpy_helper.to_array(x)
    if isinstance(x, onnx.SequenceProto):
        return [_to_value(t) for t in numpy_helper.to_list(x)]
    if isinstance(x, onnx.OptionalProto):
        return numpy_helper.to_optional(x)
    if isinstance(x, list):
        return [_to_value(t) for t in x]
    if isinstance(x, np.generic):
        return np.asarray(x)
    return x


def _read_pb(path: str) -> Any:
    data = Path(path).read_bytes()
    for cls in (onnx.TensorProto, onnx.SequenceProto, onnx.OptionalProto):
        proto = cls()
        try:
            proto.ParseFromString(data)
        except Exception:
            continue
        if cls is onnx.TensorProto and (proto.dims or proto.raw_data or proto.data_type):
            return _to_value(proto)
        if cls is not onnx.TensorProto:
            return _to_value(proto)
    raise ValueError(f"unreadable test data {path}")


def node_cases() -> Iterator[Case]:
    from onnx.backend.test.loader import load_model_tests

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tests = load_model_tests(kind="node")
    for t in tests:
        if not t.data_sets:
            continue
        names = _data_inputs(t.model)
        values = [_to_value(x) for x in t.data_sets[0][0]]
        yield Case("node", t.name, t.model, dict(zip(names, values)))


def file_cases() -> Iterator[Case]:
    for group in FILE_GROUPS:
        for model_path in sorted(glob.glob(str(DATA / group / "*" / "model.onnx"))):
            folder = Path(model_path).parent
            proto = onnx.load(model_path, load_external_data=False)
            names = _data_inputs(proto)
            files = sorted(glob.glob(str(folder / "test_data_set_0" / "input_*.pb")),
                           key=lambda p: int(Path(p).stem.split("_")[1]))
            values = [_read_pb(f) for f in files]
            yield Case(group, folder.name, model_path, dict(zip(names, values)))
    for model_path in sorted(glob.glob(str(DATA / "light" / "*.onnx"))):
        yield Case("light", Path(model_path).stem, model_path, {})


def all_cases() -> Iterator[Case]:
    yield from file_cases()
    yield from node_cases()


def ort_run(model: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    source = str(model) if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs)))


def random_inputs_for(model: Any) -> dict[str, Any]:
    from compiler.importers.onnx_file import import_onnx
    from compiler.signature import random_inputs, signature

    ir_model, _ = import_onnx(model)
    return random_inputs(signature(ir_model)["inputs"], seed=0)


def outputs_equal(expected: dict[str, Any], actual: dict[str, Any], rtol: float, atol: float) -> str | None:
    """None when equal (floats within tolerance, everything else exact), else a reason."""
    from compiler.compare import compare_arrays

    if list(expected) != list(actual):
        return f"output names {list(actual)} != {list(expected)}"
    for name, e in expected.items():
        reason = _compare_any(e, actual[name], rtol, atol, compare_arrays)
        if reason:
            return f"{name}: {reason}"
    return None


def _compare_any(e: Any, a: Any, rtol: float, atol: float, compare_arrays: Callable) -> str | None:
    if isinstance(e, list) or isinstance(a, list):
        if not (isinstance(e, list) and isinstance(a, list)) or len(e) != len(a):
            return "sequence lengths differ"
        for i, (x, y) in enumerate(zip(e, a)):
            reason = _compare_any(x, y, rtol, atol, compare_arrays)
            if reason:
                return f"[{i}] {reason}"
        return None
    if e is None or a is None:
        return None if e is None and a is None else "optional presence differs"
    return compare_arrays(np.asarray(e), np.asarray(a), rtol, atol)
