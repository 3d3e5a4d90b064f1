"""Fill in missing value shapes with onnx shape inference, tolerating failure.

Unlike onnx_ir's ShapeInferencePass this never changes the type of a graph
input or output, never overwrites a known dim, and never fails: when onnx
cannot infer the model, nothing changes. The model is serialized once, with
large initializers replaced by external-data stubs so their bytes are not
copied.

With ``symbolic=True`` onnxruntime's symbolic shape inference runs as well
(``_symbolic.py``): it solves what onnx leaves open, such as the ``-1`` of
``Reshape(x, [b, s, -1, 16])`` (the KV-head count of a GQA model) and dims
named after the graph inputs' symbolic dims (``batch``, ``sequence``).
"""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir

from passes.cleanup import _graphs

logger = logging.getLogger(__name__)

#: Initializers above this many bytes are hidden from onnx during inference.
_STUB_ABOVE_BYTES = 1024
_STUB_LOCATION = "__kiln_shape_inference_stub__"
_GENERATED_DIM_PREFIX = "unk__"


Undo = list[tuple[ir.Value, "ir.TypeProtocol | None", "ir.Shape | None"]]


def infer_missing_shapes(model: ir.Model, undo: Undo | None = None, *, symbolic: bool = False) -> int:
    """Add inferred shapes/types to intermediate values; the number of values improved.

    With ``undo``, each changed value's previous (type, shape) is appended to it,
    so a caller can use the inferred shapes transiently and then put the
    annotations back (see ``restore``). ``symbolic`` adds onnxruntime's
    symbolic shape inference (main graph only) after onnx's.
    """
    try:
        proto = _serialize_without_big_tensors(model)
        inferred = onnx.shape_inference.infer_shapes(
            proto, check_type=False, strict_mode=False, data_prop=True
        )
    except Exception as err:  # noqa: BLE001 - inference is best effort
        logger.info("onnx shape inference failed, continuing without it: %s", err)
        inferred = None
    improved = 0
    if inferred is not None:
        try:
            improved = _merge_graph(model.graph, inferred.graph, undo)
        except Exception as err:  # noqa: BLE001 - an unexpected proto layout: keep what was merged
            logger.info("could not merge inferred shapes: %s", err)
    if symbolic:
        from passes.cleanup._symbolic import symbolic_value_infos

        improved += _merge_by_name(model.graph, symbolic_value_infos(proto), undo)
    return improved


def _merge_by_name(graph: ir.Graph, infos: dict[str, onnx.TypeProto], undo: Undo | None) -> int:
    """Merge value types keyed by name into the outputs of ``graph``'s own nodes."""
    improved = 0
    if not infos:
        return 0
    for node in graph:
        has_subgraph = any(
            not a.is_ref() and a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            for a in node.attributes.values()
        )
        if has_subgraph:
            continue
        for output in node.outputs:
            type_proto = infos.get(output.name or "")
            if type_proto is None or _graphs.is_user_visible(output):
                continue
            if undo is not None:
                undo.append((output, output.type, output.shape))
            improved += _merge_value(output, type_proto)
    return improved


def _serialize_without_big_tensors(model: ir.Model) -> onnx.ModelProto:
    stubbed: list[tuple[ir.Value, ir.TensorProtocol]] = []
    try:
        for graph in _graphs.graph_likes(model):
            if not isinstance(graph, ir.Graph):
                continue
            for value in graph.initializers.values():
                tensor = value.const_value
                if tensor is None or tensor.nbytes <= _STUB_ABOVE_BYTES:
                    continue
                stubbed.append((value, tensor))
                value.const_value = ir.ExternalTensor(
                    _STUB_LOCATION,
                    offset=0,
                    length=tensor.nbytes,
                    dtype=tensor.dtype,
                    shape=ir.Shape(tensor.shape),
                    name=value.name or "",
                )
        return ir.serde.serialize_model(model)
    finally:
        for value, tensor in stubbed:
            value.const_value = tensor


def restore(undo: Undo) -> None:
    """Put back the annotations ``infer_missing_shapes`` replaced."""
    for value, old_type, old_shape in reversed(undo):
        value.type = old_type
        value.shape = old_shape


def _merge_graph(graph: ir.Graph, proto: onnx.GraphProto, undo: Undo | None = None) -> int:
    """Merge value_info of ``proto`` (the inferred copy of ``graph``) into ``graph``."""
    inferred = {info.name: info.type for info in proto.value_info}
    improved = 0
    if len(graph) != len(proto.node):
        return 0
    for node, node_proto in zip(graph, proto.node):
        # onnx merges If/Loop/Scan branch shapes loosely (an If whose branches
        # give a scalar was inferred as [1]): trust no shape it gives them.
        has_subgraph = any(
            not a.is_ref() and a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            for a in node.attributes.values()
        )
        for output in node.outputs:
            type_proto = inferred.get(output.name or "")
            if type_proto is not None and not has_subgraph and not _graphs.is_user_visible(output):
                if undo is not None:
                    undo.append((output, output.type, output.shape))
                improved += _merge_value(output, type_proto)
        sub_protos = {a.name: a for a in node_proto.attribute}
        for attr in node.attributes.values():
            if attr.is_ref() or attr.name not in sub_protos:
                continue
            if attr.type == ir.AttributeType.GRAPH:
                improved += _merge_graph(attr.value, sub_protos[attr.name].g, undo)
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub, sub_proto in zip(attr.value, sub_protos[attr.name].graphs):
                    improved += _merge_graph(sub, sub_proto, undo)
    return improved


def _merge_value(value: ir.Value, type_proto: onnx.TypeProto) -> int:
    if value.type is not None and not isinstance(value.type, ir.TensorType):
        return 0
    new_type = ir.serde.deserialize_type_proto_for_type(type_proto)
    new_shape = ir.serde.deserialize_type_proto_for_shape(type_proto)
    if not isinstance(new_type, ir.TensorType):
        return 0
    if value.type is not None and value.dtype != new_type.dtype:
        return 0  # contradicts what is known: trust neither more
    improved = False
    if value.type is None:
        value.type = new_type
        improved = True
    if new_shape is None:
        return int(improved)
    if value.shape is None:
        value.shape = _without_generated_names(new_shape)
        return 1
    if len(value.shape) != len(new_shape):
        return int(improved)
    dims = list(value.shape)
    for i, (old, new) in enumerate(zip(dims, _without_generated_names(new_shape))):
        if not isinstance(old, int) and isinstance(new, int):
            dims[i] = new
            improved = True
        elif isinstance(old, ir.SymbolicDim) and old.value is None and isinstance(new, ir.SymbolicDim) and new.value:
            dims[i] = new  # a named dim (dims with one name are equal) where nothing was known
            improved = True
    if improved:
        value.shape = ir.Shape(dims)
    return int(improved)


def _without_generated_names(shape: ir.Shape) -> ir.Shape:
    """Drop the dim names onnx invents (unk__N): they are only unique per run,
    so keeping them could make unrelated dims look equal later."""
    return ir.Shape(
        [
            ir.SymbolicDim(None)
            if isinstance(d, ir.SymbolicDim) and (d.value or "").startswith(_GENERATED_DIM_PREFIX)
            else d
            for d in shape
        ]
    )
