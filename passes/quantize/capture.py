"""Run a model in onnxruntime and capture intermediate values (activations for calibration and error reports)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir


def with_outputs(model: ir.Model, names: Sequence[str]) -> bytes:
    """The serialized model with the named values added as graph outputs (the model itself is not changed)."""
    proto = ir.to_proto(model)
    existing = {o.name for o in proto.graph.output}
    values = _values_by_name(model.graph)
    import onnx

    for name in names:
        if name in existing:
            continue
        value = values.get(name)
        if value is None:
            raise KeyError(f"no value named {name!r} in the main graph")
        elem = value.dtype.value if value.dtype is not None else onnx.TensorProto.FLOAT
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
        existing.add(name)
    return proto.SerializeToString()


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.inputs}
    values.update(graph.initializers)
    for node in graph:
        for out in node.outputs:
            if out.name:
                values[out.name] = out
    return values


def session(model: bytes | str | ir.Model, *, optimize: bool = True):
    """A CPU onnxruntime session (graph optimizations on unless ``optimize`` is False)."""
    import onnxruntime as ort

    if isinstance(model, ir.Model):
        model = ir.to_proto(model).SerializeToString()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def capture(
    model: ir.Model, names: Sequence[str], batches: Iterable[Mapping[str, np.ndarray]], *, chunk: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """For each input batch, the named values (and the graph outputs) as a dict.

    ``chunk`` > 0 captures at most that many values per session (one pass over
    the batches per chunk) to bound memory on big models; batches must then be
    re-iterable (a list or a CalibrationSet).
    """
    names = list(dict.fromkeys(names))
    groups = [names[i : i + chunk] for i in range(0, len(names), chunk)] if chunk and names else [names]
    if len(groups) == 1:
        sess = session(with_outputs(model, groups[0]))
        outs = [o.name for o in sess.get_outputs()]
        for feed in batches:
            yield dict(zip(outs, sess.run(outs, dict(feed))))
        return
    sessions = []
    for group in groups:
        sess = session(with_outputs(model, group))
        sessions.append((sess, [o.name for o in sess.get_outputs()]))
    for feed in batches:
        result: dict[str, np.ndarray] = {}
        for sess, outs in sessions:
            result.update(zip(outs, sess.run(outs, dict(feed))))
        yield result
