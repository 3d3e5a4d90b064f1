"""Shared test helpers: build models from ONNX text, run them with onnxruntime, compare.

Typical pass test::

    model, report = optimize(TEXT, "fold-constants")   # parse, run, verify, compare
    assert report.modified
    assert op_types(model) == ["Add"]

or step by step::

    model = model_from_text(TEXT)
    before = snapshot(model)
    report = run_passes(model, "fold-constants")
    assert_same_outputs(before, model)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir

#: Size given to symbolic dims when making random inputs.
SYMBOLIC_DIM = 3


def model_from_text(text: str) -> ir.Model:
    """An IR model parsed from ONNX textual syntax (``onnx.parser.parse_model``)."""
    return ir.serde.deserialize_model(onnx.parser.parse_model(text))


def model_from_proto(proto: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(proto)


def snapshot(model: ir.Model) -> onnx.ModelProto:
    """A serialized copy of the model as it is now (to compare against later)."""
    return ir.serde.serialize_model(model)


def run_passes(model: ir.Model, pipeline: str):
    """Run a pipeline string through the PassManager (verifying after each pass)."""
    from compiler.passes import PassManager

    return PassManager(pipeline).run(model)


def op_types(model: ir.Model | ir.Graph) -> list[str]:
    """The op types of the (main) graph's nodes, in order."""
    graph = model.graph if isinstance(model, ir.Model) else model
    return [node.op_type for node in graph]


def all_op_types(model: ir.Model) -> list[str]:
    """The op types of every node, subgraphs included."""
    return [node.op_type for node in model.graph.all_nodes()]


def random_feeds(
    model: ir.Model | onnx.ModelProto, seed: int = 0, *, skip_initialized: bool = True
) -> dict[str, np.ndarray]:
    """Random inputs for the model's graph inputs (symbolic dims become SYMBOLIC_DIM).

    Graph inputs that have an initializer (overridable defaults) are left out
    unless ``skip_initialized`` is False.
    """
    proto = model if isinstance(model, onnx.ModelProto) else snapshot(model)
    initialized = {t.name for t in proto.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds = {}
    for info in proto.graph.input:
        if skip_initialized and info.name in initialized:
            continue
        tensor_type = info.type.tensor_type
        shape = [
            d.dim_value if d.HasField("dim_value") else SYMBOLIC_DIM for d in tensor_type.shape.dim
        ]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        feeds[info.name] = _random_array(rng, shape, dtype)
    return feeds


def _random_array(rng: np.random.Generator, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if dtype.kind in "iu":
        return rng.integers(1, 5, size=shape).astype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(size=shape).astype(dtype)
    raise ValueError(f"no random inputs for dtype {dtype}")


def run_ort(model: ir.Model | onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The model's outputs under onnxruntime (CPU, no graph optimizations)."""
    import onnxruntime as ort

    proto = model if isinstance(model, onnx.ModelProto) else snapshot(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, dict(feeds))


def assert_same_outputs(
    original: ir.Model | onnx.ModelProto,
    optimized: ir.Model | onnx.ModelProto,
    feeds: Mapping[str, np.ndarray] | None = None,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """Both models give the same outputs (by position) under onnxruntime."""
    original_proto = original if isinstance(original, onnx.ModelProto) else snapshot(original)
    optimized_proto = optimized if isinstance(optimized, onnx.ModelProto) else snapshot(optimized)
    assert [o.name for o in original_proto.graph.output] == [
        o.name for o in optimized_proto.graph.output
    ], "graph output names changed"
    feeds = random_feeds(original_proto) if feeds is None else feeds
    expected = run_ort(original_proto, feeds)
    actual = run_ort(optimized_proto, feeds)
    assert len(expected) == len(actual)
    for i, (want, got) in enumerate(zip(expected, actual)):
        want, got = np.asarray(want), np.asarray(got)
        assert want.dtype == got.dtype, f"output {i}: dtype {got.dtype} != {want.dtype}"
        assert want.shape == got.shape, f"output {i}: shape {got.shape} != {want.shape}"
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=f"output {i}")


def io_signature(model: ir.Model) -> tuple:
    """Names and types of the main graph's inputs and outputs (must survive passes)."""
    graph = model.graph
    return (
        tuple((v.name, str(v.type), str(v.shape)) for v in graph.inputs),
        tuple((v.name, str(v.type), str(v.shape)) for v in graph.outputs),
    )


def assert_unique_names(model: ir.Model) -> None:
    """No two values share a name anywhere in the model; node names are unique per graph."""
    values: set[str] = set()
    for graph in [model.graph, *model.graph.subgraphs()]:
        node_names: set[str] = set()
        for value in [*graph.inputs, *graph.initializers.values()]:
            if value.is_graph_input() and value.is_initializer() and value.name in values:
                continue  # an overridable initializer is its input
            assert value.name not in values, f"value name {value.name!r} twice"
            values.add(value.name)
        for node in graph:
            if node.name:
                assert node.name not in node_names, f"node name {node.name!r} twice"
                node_names.add(node.name)
            for value in node.outputs:
                if value.name:
                    assert value.name not in values, f"value name {value.name!r} twice"
                    values.add(value.name)


def optimize(text: str, pipeline: str, *, compare: bool = True, feeds=None):
    """Parse ``text``, run ``pipeline`` and check the result: it verifies, keeps
    the graph's input/output signature and unique names, and (when ``compare``)
    computes what the original did under onnxruntime. Returns (model, report)."""
    from compiler.ir.verifier import verify_model

    model = model_from_text(text)
    before = snapshot(model)
    signature = io_signature(model)
    report = run_passes(model, pipeline)
    verify_model(model)
    assert io_signature(model) == signature, "graph inputs/outputs changed"
    assert_unique_names(model)
    if compare:
        assert_same_outputs(before, model, feeds)
    return model, report
