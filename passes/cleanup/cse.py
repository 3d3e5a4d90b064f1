"""cse: common-subexpression elimination.

Two nodes compute the same thing when they run the same op (domain, type,
overload, version) on the same input values with equal attributes; the later
one's users switch to the earlier one's outputs. One hash-table pass per graph
in topological order, so chains of duplicates merge in one run.

Not merged: random ops, ops outside the standard domains (they may have
state), nodes with subgraphs, nodes whose outputs are graph outputs. Small
identical constant initializers (same dtype, shape, bytes and metadata) are
merged first, so nodes reading copies of one constant merge too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import ClassVar

import onnx_ir as ir

from compiler.passes import Pass, PassResult, register
from passes.cleanup import _graphs

#: Domains whose nodes CSE may merge (pure, standard ops).
_MERGEABLE_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})


class _Unhashable(Exception):
    """An attribute CSE does not compare (graphs, sparse tensors)."""


@register
@dataclasses.dataclass(frozen=True)
class CommonSubexpressionElimination(Pass):
    """Merge nodes (and small constant initializers) that compute the same value."""

    name: ClassVar[str] = "cse"
    summary: ClassVar[str] = "merge duplicate nodes and small duplicate constant initializers"

    initializers: bool = True
    max_initializer_elements: int = 1024

    def call(self, model: ir.Model) -> PassResult:
        modified = False
        for graph in _graphs.graph_likes(model):
            if self.initializers and isinstance(graph, ir.Graph):
                modified |= self._merge_initializers(graph)
            modified |= _merge_nodes(graph)
        return PassResult(model, modified)

    def _merge_initializers(self, graph: ir.Graph) -> bool:
        seen: dict[Hashable, ir.Value] = {}
        duplicates: list[str] = []
        for name, value in graph.initializers.items():
            tensor = value.const_value
            if tensor is None or _graphs.is_user_visible(value):
                continue
            if tensor.size > self.max_initializer_elements:
                continue
            try:
                key = (_tensor_key(tensor), tuple(sorted(value.metadata_props.items())))
            except _Unhashable:
                continue
            kept = seen.setdefault(key, value)
            if kept is not value:
                value.replace_all_uses_with(kept)
                duplicates.append(name)
        for name in duplicates:
            del graph.initializers[name]
        return bool(duplicates)


def _merge_nodes(graph: _graphs.GraphLike) -> bool:
    seen: dict[Hashable, ir.Node] = {}
    duplicates: list[ir.Node] = []
    for node in graph:
        key = _node_key(node)
        if key is None:
            continue
        kept = seen.setdefault(key, node)
        if kept is node:
            continue
        if any(output.is_graph_output() for output in node.outputs):
            continue
        for output, kept_output in zip(node.outputs, kept.outputs):
            if kept_output.type is None and output.type is not None:
                kept_output.type = output.type
            if kept_output.shape is None and output.shape is not None:
                kept_output.shape = output.shape
            output.replace_all_uses_with(kept_output)
        duplicates.append(node)
    _graphs.remove_nodes(graph, duplicates)
    return bool(duplicates)


def _node_key(node: ir.Node) -> Hashable | None:
    if node.domain not in _MERGEABLE_DOMAINS or node.op_type in _graphs.NON_DETERMINISTIC_OPS:
        return None
    try:
        attributes = tuple(sorted(_attr_key(attr) for attr in node.attributes.values()))
    except _Unhashable:
        return None
    return (
        node.domain,
        node.op_type,
        node.overload,
        node.version,
        tuple(node.inputs),
        len(node.outputs),
        attributes,
    )


def _attr_key(attr: ir.Attr) -> tuple:
    if attr.is_ref():
        return (attr.name, "ref", attr.type.value, attr.ref_attr_name)
    kind = attr.type
    value = attr.value
    if kind == ir.AttributeType.FLOAT:
        # float.hex keeps 0.0 and -0.0 apart and makes NaNs equal.
        value = float(value).hex()
    elif kind == ir.AttributeType.FLOATS:
        value = tuple(float(v).hex() for v in value)
    elif kind in (ir.AttributeType.INTS, ir.AttributeType.STRINGS):
        value = tuple(value)
    elif kind == ir.AttributeType.TENSOR:
        value = _tensor_key(value)
    elif kind == ir.AttributeType.TENSORS:
        value = tuple(_tensor_key(t) for t in value)
    elif kind in (ir.AttributeType.TYPE_PROTO, ir.AttributeType.TYPE_PROTOS):
        value = repr(value)
    elif kind not in (ir.AttributeType.INT, ir.AttributeType.STRING):
        raise _Unhashable(attr.name)
    return (attr.name, kind.value, value)


def _tensor_key(tensor: ir.TensorProtocol) -> tuple:
    if tensor.dtype == ir.DataType.STRING:
        data: Hashable = tuple(tensor.numpy().reshape(-1).tolist())
    else:
        data = tensor.tobytes()
    return (tensor.dtype.value, tuple(tensor.shape.numpy()), data)
