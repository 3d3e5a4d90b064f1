"""Helpers for the pruning tests: small graphs with onnx.helper, onnxruntime runs, kept-channel recovery.

Which channels survived is read back from the weights themselves (a pruned
filter is bit-identical to one original filter), never from kiln's own plan,
so the exactness checks do not trust the code they test.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def weight(rng: np.random.Generator, *shape: int, scale: float = 0.5) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def make_model(nodes, inputs, outputs, initializers, opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def tensor(name: str, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def prune(proto: onnx.ModelProto, spec: str, calibration=None, recover: str | None = None, target=None):
    """(pruned proto, report): kiln's prune stage on the IR of ``proto`` (no other pass)."""
    from passes.prune import parse_prune, prune_model
    from passes.quantize.calibration import CalibrationSet

    model = ir.serde.deserialize_model(proto)
    cal = CalibrationSet.from_feeds(calibration) if calibration is not None else None
    report = prune_model(model, target, parse_prune(spec, recover), cal)
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out)
    return out, report


def run(proto: onnx.ModelProto, feeds: dict, extra: tuple[str, ...] = (), optimize: bool = False) -> dict[str, np.ndarray]:
    """onnxruntime outputs (and the named intermediate values) of ``proto`` on ``feeds`` (graph
    optimizations off unless ``optimize``: exact comparisons want the graph as written)."""
    import onnxruntime as ort

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    have = {o.name for o in model.graph.output}
    for name in extra:
        if name not in have:
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def initializer(proto: onnx.ModelProto, name: str) -> np.ndarray:
    for t in proto.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def node_weight(proto: onnx.ModelProto, node_name: str, index: int = 1) -> np.ndarray:
    """The initializer a node reads at input ``index``."""
    for node in proto.graph.node:
        if node.name == node_name:
            return initializer(proto, node.input[index])
    raise KeyError(node_name)


def kept_indices(original: np.ndarray, pruned: np.ndarray, axis: int) -> np.ndarray:
    """For each slice of ``pruned`` along ``axis``, the index of the identical slice of ``original``."""
    orig = np.moveaxis(original, axis, 0).reshape(original.shape[axis], -1)
    new = np.moveaxis(pruned, axis, 0).reshape(pruned.shape[axis], -1)
    out = []
    for row in new:
        hits = [i for i in range(len(orig)) if orig[i].shape == row.shape and np.array_equal(orig[i], row)]
        assert len(hits) == 1, f"a pruned slice matches {len(hits)} original slices"
        out.append(hits[0])
    return np.asarray(out)


def with_initializers(proto: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``proto`` with some initializers replaced."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    for t in model.graph.initializer:
        if t.name in arrays:
            t.CopyFrom(numpy_helper.from_array(arrays[t.name], t.name))
    return model


def params(proto: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT)
