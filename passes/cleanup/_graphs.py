"""Helpers shared by the cleanup passes: walking graphs, constants, removing nodes.

Not a pass; every function here is linear in what it touches.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator

import numpy as np
import onnx_ir as ir

from compiler.ir.quant import KEY as QUANT_RECORD_KEY

GraphLike = ir.Graph | ir.Function

#: Domains whose ops are the ONNX standard ones (deterministic, no side effects).
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})

#: Ops whose result is random (Dropout is random in training mode).
NON_DETERMINISTIC_OPS = frozenset(
    {
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "Dropout",
    }
)

#: Value metadata that marks a weight for later quantization; folding would drop it.
QUANT_KEY = QUANT_RECORD_KEY

#: Initializers can live outside graph inputs from IR version 4 on.
FIRST_IR_WITH_FREE_INITIALIZERS = 4


def is_standard(node: ir.Node) -> bool:
    return node.domain in STANDARD_DOMAINS


def subgraphs(node: ir.Node) -> list[ir.Graph]:
    """The graphs held in the node's attributes (If branches, Loop/Scan bodies)."""
    found: list[ir.Graph] = []
    for attr in node.attributes.values():
        if attr.is_ref():
            continue
        if attr.type == ir.AttributeType.GRAPH:
            found.append(attr.value)
        elif attr.type == ir.AttributeType.GRAPHS:
            found.extend(attr.value)
    return found


def has_subgraphs(node: ir.Node) -> bool:
    return any(
        not attr.is_ref() and attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        for attr in node.attributes.values()
    )


def has_ref_attrs(node: ir.Node) -> bool:
    """Whether an attribute refers to an attribute of the enclosing function."""
    return any(attr.is_ref() for attr in node.attributes.values())


def graph_likes(model: ir.Model) -> Iterator[GraphLike]:
    """The main graph, then every function, then the subgraphs of each.

    A graph is yielded before its subgraphs are collected, so a caller may edit
    it (subgraphs of nodes it removed are then not visited).
    """
    pending: collections.deque[GraphLike] = collections.deque([model.graph])
    pending.extend(model.functions.values())
    while pending:
        graph = pending.popleft()
        yield graph
        for node in graph:
            pending.extend(subgraphs(node))


def default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def uses_initializers(model: ir.Model, graph: GraphLike) -> bool:
    """Whether new constants in ``graph`` become initializers (else Constant nodes)."""
    version = model.ir_version if model.ir_version is not None else FIRST_IR_WITH_FREE_INITIALIZERS
    return isinstance(graph, ir.Graph) and version >= FIRST_IR_WITH_FREE_INITIALIZERS


def is_user_visible(value: ir.Value) -> bool:
    """Whether the value is an input or output of some graph (its name is a contract)."""
    return value.is_graph_output() or value.is_graph_input()


# ---------------------------------------------------------------- constants


def constant_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The data of a value that is constant: an initializer that is no graph
    input (so not overridable), or the output of a Constant node."""
    if value is None:
        return None
    producer = value.producer()
    if producer is None:
        # Initializers, and constants a pass created but has not registered yet.
        return None if value.is_graph_input() else value.const_value
    if producer is not None and producer.op_type == "Constant" and is_standard(producer):
        return constant_node_tensor(producer)
    return None


def constant_node_tensor(node: ir.Node) -> ir.TensorProtocol | None:
    """The tensor a Constant node produces (None for sparse or referenced values)."""
    if len(node.attributes) != 1:
        return None
    attr = next(iter(node.attributes.values()))
    if attr.is_ref():
        return None
    name = attr.name
    if name == "value":
        return attr.as_tensor()
    if name == "value_float":
        return ir.tensor(np.array(attr.as_float(), dtype=np.float32))
    if name == "value_floats":
        return ir.tensor(np.array(attr.as_floats(), dtype=np.float32).reshape(-1))
    if name == "value_int":
        return ir.tensor(np.array(attr.as_int(), dtype=np.int64))
    if name == "value_ints":
        return ir.tensor(np.array(attr.as_ints(), dtype=np.int64).reshape(-1))
    if name == "value_string":
        return ir.StringTensor(np.array(attr.as_string().encode()))
    if name == "value_strings":
        return ir.StringTensor(np.array([s.encode() for s in attr.as_strings()], dtype=object))
    return None


def constant_ints(value: ir.Value | None) -> list[int] | None:
    """A constant integer tensor's elements, flattened; None when not constant."""
    tensor = constant_tensor(value)
    if tensor is None or not tensor.dtype.is_integer():
        return None
    return [int(v) for v in tensor.numpy().reshape(-1)]


def has_quant_record(value: ir.Value | None) -> bool:
    return value is not None and QUANT_KEY in value.metadata_props


# ---------------------------------------------------------------- editing


def detach(node: ir.Node) -> None:
    """Drop the node's uses of its inputs, and those of every node in its subgraphs
    (which may use outer values), so removed nodes keep nothing alive."""
    for index, value in enumerate(node.inputs):
        if value is not None:
            node.replace_input_with(index, None)
    for graph in subgraphs(node):
        for inner in graph:
            detach(inner)


def remove_nodes(graph: GraphLike, nodes: Iterable[ir.Node]) -> None:
    """Detach and remove nodes in one batch (Graph.remove is linear per call)."""
    nodes = list(nodes)
    if not nodes:
        return
    for node in nodes:
        detach(node)
    graph.remove(nodes)


def replace_with_constant(
    graph: GraphLike,
    node: ir.Node,
    old: ir.Value,
    tensor: ir.TensorProtocol,
    *,
    as_initializer: bool,
) -> ir.Value:
    """Make a constant holding ``tensor`` take the place of ``old`` (an output of
    ``node``, which the caller removes afterwards). The constant takes the old
    value's name once the caller has removed the node; see ``adopt_names``.

    ``old`` must not be a graph output.
    """
    new = ir.Value(
        # A temporary name (serializing a node that reads the value needs one).
        name=_placeholder_name(old),
        type=ir.TensorType(tensor.dtype),
        shape=ir.Shape(tensor.shape),
        const_value=tensor if as_initializer else None,
    )
    _copy_metadata(old, new)
    if not as_initializer:
        constant = ir.Node(
            "",
            "Constant",
            inputs=(),
            attributes=(ir.AttrTensor("value", tensor),),
            outputs=(new,),
            # The folded node's name is free once it is removed; one name per node.
            name=(node.name or "") if old.index() == 0 else "",
        )
        graph.insert_before(node, constant)
    old.replace_all_uses_with(new)
    return new


def adopt_names(graph: GraphLike, renames: Iterable[tuple[ir.Value, ir.Value]]) -> None:
    """Give each (old, new) pair's new value the old name; register initializers.

    Called after the old producers were removed, so names stay unique.
    """
    for old, new in renames:
        name = old.name or new.name
        old.name = None
        new.name = name
        if new.const_value is not None and isinstance(graph, ir.Graph):
            graph.register_initializer(new)


def _placeholder_name(old: ir.Value) -> str:
    return f"{old.name}__kiln_folding"


def _copy_metadata(source: ir.Value, target: ir.Value) -> None:
    if source.metadata_props:
        target.metadata_props.update(source.metadata_props)
    if source.doc_string:
        target.doc_string = source.doc_string
