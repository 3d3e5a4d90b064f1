"""fold-constants: evaluate nodes whose inputs are all constant.

A node is folded when every input it has is an initializer that is no graph
input, or the output of a Constant node. Its outputs become initializers (or
Constant nodes where initializers cannot be used: functions, IR version < 4)
that keep the old value names. Constant nodes themselves become initializers.

Never folded: nodes with subgraphs, random ops, ops outside the standard
domain, sequence/optional values, strings, nodes with a graph output, and
folds that would blow up the file (see ``_too_big``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from compiler.passes import Pass, PassResult, register
from passes.cleanup import _graphs
from passes.cleanup._evaluate import evaluate

#: Folds growing the data beyond its inputs are fine up to this many bytes.
SMALL_OUTPUT_BYTES = 4096

#: Ops that produce sequences or optionals, or have hidden state.
_NOT_TENSOR_OPS = frozenset(
    {
        "SequenceConstruct",
        "SequenceEmpty",
        "SequenceInsert",
        "SequenceErase",
        "SequenceAt",
        "SequenceLength",
        "SequenceMap",
        "SplitToSequence",
        "ConcatFromSequence",
        "Optional",
        "OptionalGetElement",
        "OptionalHasElement",
    }
)

#: Ops whose output size is predicted from their inputs before evaluating them.
_EXPANDING_OPS = frozenset({"ConstantOfShape", "Expand", "Tile", "Range"})


@register
@dataclasses.dataclass(frozen=True)
class FoldConstants(Pass):
    """Replace nodes computing only from constants by the constants they compute."""

    name: ClassVar[str] = "fold-constants"
    summary: ClassVar[str] = "evaluate nodes with all-constant inputs; Constant nodes become initializers"

    size_limit: int = 1 << 20

    def call(self, model: ir.Model) -> PassResult:
        modified = False
        opset = _graphs.default_opset(model)
        for graph in _graphs.graph_likes(model):
            graph_opset = graph.opset_imports.get("", opset)
            modified |= self._fold_graph(model, graph, graph_opset)
        return PassResult(model, modified)

    def _fold_graph(self, model: ir.Model, graph: _graphs.GraphLike, opset: int) -> bool:
        as_initializer = _graphs.uses_initializers(model, graph)
        folded: list[ir.Node] = []
        renames: list[tuple[ir.Value, ir.Value]] = []
        for node in list(graph):
            if node.op_type == "Constant" and _graphs.is_standard(node):
                if as_initializer:
                    replacements = self._constant_to_initializer(node)
                else:
                    replacements = None
            else:
                replacements = self._fold_node(node, opset)
            if replacements is None:
                continue
            for old, tensor in replacements:
                new = _graphs.replace_with_constant(
                    graph, node, old, tensor, as_initializer=as_initializer
                )
                renames.append((old, new))
            folded.append(node)
        _graphs.remove_nodes(graph, folded)
        _graphs.adopt_names(graph, renames)
        return bool(folded)

    @staticmethod
    def _constant_to_initializer(node: ir.Node) -> list[tuple[ir.Value, ir.TensorProtocol]] | None:
        (output,) = node.outputs
        if output.is_graph_output() or not output.uses():
            return None
        tensor = _graphs.constant_node_tensor(node)
        if tensor is None:
            return None
        return [(output, tensor)]

    def _fold_node(self, node: ir.Node, opset: int) -> list[tuple[ir.Value, ir.TensorProtocol]] | None:
        if not _foldable(node):
            return None
        tensors = []
        for value in node.inputs:
            if value is None:
                tensors.append(None)
                continue
            tensor = _graphs.constant_tensor(value)
            if tensor is None or tensor.dtype == ir.DataType.STRING or _graphs.has_quant_record(value):
                return None
            tensors.append(tensor)
        if all(t is None for t in tensors):
            return None
        input_bytes = sum(t.nbytes for t in tensors if t is not None)
        predicted = _predicted_bytes(node, tensors)
        if predicted is None:
            if any(t is not None and t.nbytes > self.size_limit for t in tensors):
                return None  # an unknown-size result from big data: not worth evaluating
        elif self._too_big(predicted, input_bytes):
            return None
        try:
            arrays = [None if t is None else t.numpy() for t in tensors]
            results = evaluate(node, arrays, opset)
        except Exception:  # noqa: BLE001 - a node that cannot be evaluated is left alone
            return None
        if results is None or self._too_big(sum(r.nbytes for r in results), input_bytes):
            return None
        replacements = []
        for index, output in enumerate(node.outputs):
            if not output.uses():
                continue  # an unused (or absent optional) output needs no constant
            if index >= len(results):
                return None
            tensor = _to_tensor(results[index], output)
            if tensor is None:
                return None
            replacements.append((output, tensor))
        return replacements

    def _too_big(self, output_bytes: float, input_bytes: int) -> bool:
        if output_bytes > self.size_limit:
            return True
        return output_bytes > SMALL_OUTPUT_BYTES and output_bytes > input_bytes


def _foldable(node: ir.Node) -> bool:
    if not _graphs.is_standard(node):
        return False
    if node.op_type in _graphs.NON_DETERMINISTIC_OPS or node.op_type in _NOT_TENSOR_OPS:
        return False
    if _graphs.has_subgraphs(node) or _graphs.has_ref_attrs(node):
        return False
    used = False
    for output in node.outputs:
        if output.is_graph_output():
            return False
        if output.type is not None and not isinstance(output.type, ir.TensorType):
            return False
        if output.dtype == ir.DataType.STRING:
            return False
        used = used or bool(output.uses())
    return used


def _predicted_bytes(node: ir.Node, tensors: list[ir.TensorProtocol | None]) -> float | None:
    """The bytes the node's outputs will take, when known before evaluating it."""
    total = 0.0
    for output in node.outputs:
        itemsize = _itemsize(output.dtype)
        if output.shape is not None and output.shape.is_static() and itemsize is not None:
            total += math.prod(output.shape.numpy()) * itemsize
            continue
        if node.op_type not in _EXPANDING_OPS or len(node.outputs) != 1:
            return None
        elements = _predicted_elements(node, tensors)
        if elements is None:
            # Evaluating might allocate anything; only a known small result is folded.
            return float("inf")
        return elements * (itemsize or 8)
    return total


def _predicted_elements(node: ir.Node, tensors: list[ir.TensorProtocol | None]) -> int | None:
    try:
        arrays = [None if t is None else t.numpy() for t in tensors]
        if node.op_type == "ConstantOfShape":
            return math.prod(int(d) for d in arrays[0].reshape(-1))
        if node.op_type == "Expand":
            shape = tuple(int(d) for d in arrays[1].reshape(-1))
            return math.prod(np.broadcast_shapes(arrays[0].shape, shape))
        if node.op_type == "Tile":
            repeats = [int(r) for r in arrays[1].reshape(-1)]
            return math.prod(d * r for d, r in zip(arrays[0].shape, repeats))
        if node.op_type == "Range":
            start, limit, delta = (a.reshape(()).item() for a in arrays)
            return max(math.ceil((limit - start) / delta), 0)
    except Exception:  # noqa: BLE001 - an invalid node: evaluation will fail too
        return None
    return None


def _itemsize(dtype: ir.DataType | None) -> float | None:
    if dtype is None:
        return None
    try:
        return dtype.itemsize
    except TypeError:
        return None


def _to_tensor(array: np.ndarray, output: ir.Value) -> ir.Tensor | None:
    """The result as a tensor, if it has the type the graph declares for it."""
    if array.dtype.kind in "OSU":
        return None
    try:
        dtype = ir.DataType.from_numpy(array.dtype)
    except Exception:  # noqa: BLE001 - an unknown numpy dtype
        return None
    if output.dtype is not None and output.dtype != dtype:
        return None
    shape = output.shape
    if shape is not None:
        if len(shape) != array.ndim:
            return None
        for dim, size in zip(shape, array.shape):
            if isinstance(dim, int) and dim != size:
                return None
    return ir.Tensor(np.asarray(array, order="C"), dtype=dtype)
