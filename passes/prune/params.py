"""Weights as pruning sees them: constant initializers, or ConstantOfShape fills.

Some models (the light CNNs in the onnx wheel) store every weight as
``ConstantOfShape(shape)``: a fill that fold-constants deliberately leaves
unexpanded. A ``Param`` reads either kind (a fill's per-channel norms are all
equal, so magnitude criteria see ties, broken by channel index) and prunes it
in kind: a fill gets a smaller shape, never materialized data.

Rewrites replace the tensor in place when the node is its only reader, and
otherwise give the node its own sliced copy, so a shared constant is never
sliced for one reader and wrong for another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


@dataclasses.dataclass
class Param:
    value: ir.Value
    #: "const" (an initializer or constant) or "fill" (ConstantOfShape of a constant shape)
    kind: str
    shape: tuple[int, ...]
    dtype: ir.DataType
    fill: float = 0.0

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return int(self.numel * self.dtype.itemsize)

    def array(self) -> np.ndarray:
        if self.kind == "fill":
            return np.full(self.shape, self.fill, dtype=self.dtype.numpy())
        return self.value.const_value.numpy()

    def norms(self, axis: int, order: int) -> np.ndarray:
        """Per-index L1 (order 1) or L2 (order 2) norm along ``axis`` over every other axis (float64)."""
        if self.kind == "fill":
            rest = self.numel // self.shape[axis] if self.shape[axis] else 0
            value = abs(self.fill) * rest if order == 1 else abs(self.fill) * np.sqrt(rest)
            return np.full(self.shape[axis], value, dtype=np.float64)
        data = np.asarray(self.array())
        if data.dtype.kind != "f" or data.dtype.itemsize < 4:
            data = data.astype(np.float32)
        n = self.shape[axis]
        if axis == data.ndim - 1:
            rows, spec = data.reshape(-1, n), "ij,ij->j"
        else:
            rows, spec = np.moveaxis(data, axis, 0).reshape(n, -1), "ij,ij->i"
        if order == 1:
            return np.abs(rows).sum(axis=0 if spec.endswith("j") else 1).astype(np.float64)
        return np.sqrt(np.einsum(spec, rows, rows).astype(np.float64))


def find_param(value: ir.Value | None) -> Param | None:
    """The weight ``value`` holds, or None when it is computed."""
    if value is None:
        return None
    tensor = value.const_value
    if tensor is not None:
        return Param(value, "const", tuple(int(d) for d in tensor.shape), tensor.dtype)
    node = value.producer()
    if node is None or node.op_type != "ConstantOfShape" or node.domain not in ("", "ai.onnx"):
        return None
    shape_value = node.inputs[0] if node.inputs else None
    if shape_value is None or shape_value.const_value is None:
        return None
    shape = tuple(int(d) for d in shape_value.const_value.numpy().reshape(-1))
    attr = node.attributes.get("value")
    if attr is None:
        return Param(value, "fill", shape, ir.DataType.FLOAT, 0.0)
    fill = attr.as_tensor()
    return Param(value, "fill", shape, fill.dtype, float(fill.numpy().reshape(-1)[0]))


def is_float(param: Param) -> bool:
    return param.dtype in FLOAT_TYPES


class Rewriter:
    """Slices weights read by nodes, naming new tensors uniquely."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.taken = set(graph.initializers)
        for node in graph:
            self.taken.update(o.name for o in node.outputs if o.name)
        self.taken.update(v.name for v in graph.inputs if v.name)

    def fresh(self, hint: str) -> str:
        base, i = f"{hint}_pruned", 0
        name = base
        while name in self.taken:
            i += 1
            name = f"{base}{i}"
        self.taken.add(name)
        return name

    def slice(self, node: ir.Node, index: int, cuts: Sequence[tuple[int, Sequence[int]]]) -> None:
        """Keep ``indices`` along each ``axis`` of the weight ``node`` reads at input ``index``."""
        value = node.inputs[index]
        param = find_param(value)
        assert param is not None, f"{node.name}: input {index} is not a weight"
        if param.kind == "fill":
            shape = list(param.shape)
            for axis, keep in cuts:
                shape[axis] = len(keep)
            self._refill(node, index, param, shape)
            return
        data = param.array()
        for axis, keep in cuts:
            data = np.take(data, np.asarray(keep, dtype=np.int64), axis=axis)
        self.set_const(node, index, np.ascontiguousarray(data))

    def set_const(self, node: ir.Node, index: int, data: np.ndarray) -> None:
        """Make ``node`` read ``data`` at input ``index`` (in place when it is the only reader)."""
        value = node.inputs[index]
        if value.const_value is not None and _sole_reader(value, node, index) and value.is_initializer():
            value.const_value = ir.tensor(data, name=value.name)
            value.shape = ir.Shape(data.shape)
            return
        new = ir.Value(name=self.fresh(value.name or node.name or "weight"), shape=ir.Shape(data.shape),
                       type=ir.TensorType(ir.DataType(value.dtype) if value.dtype is not None else ir.DataType.FLOAT))
        new.const_value = ir.tensor(data, name=new.name)
        self.graph.register_initializer(new)
        node.replace_input_with(index, new)

    def _refill(self, node: ir.Node, index: int, param: Param, shape: list[int]) -> None:
        fill_node = param.value.producer()
        shape_array = np.asarray(shape, dtype=np.int64)
        if _sole_reader(param.value, node, index) and _sole_reader(fill_node.inputs[0], fill_node, 0):
            self.set_const(fill_node, 0, shape_array)
            param.value.shape = ir.Shape(shape)
            return
        shape_value = ir.Value(name=self.fresh(f"{param.value.name or 'fill'}_shape"), shape=ir.Shape([len(shape)]),
                               type=ir.TensorType(ir.DataType.INT64))
        shape_value.const_value = ir.tensor(shape_array, name=shape_value.name)
        self.graph.register_initializer(shape_value)
        out = ir.Value(name=self.fresh(param.value.name or "fill"), shape=ir.Shape(shape), type=param.value.type)
        attrs = [a for a in fill_node.attributes.values()]
        new_node = ir.Node("", "ConstantOfShape", [shape_value], attrs, outputs=[out],
                           name=self.fresh(fill_node.name or "ConstantOfShape"))
        self.graph.insert_before(node, new_node)
        node.replace_input_with(index, out)


def _sole_reader(value: ir.Value, node: ir.Node, index: int) -> bool:
    uses = list(value.uses())
    return len(uses) == 1 and uses[0][0] is node and uses[0][1] == index and not value.is_graph_output()


def model_params(model: ir.Model) -> tuple[int, int, int]:
    """(parameters, bytes, embedding parameters) of the main graph's floating-point weights.

    Weights are initializers and ConstantOfShape fills; embedding tables are
    the data of Gathers (counted in the first figure too).
    """
    seen: set[int] = set()
    total = nbytes = embed = 0
    for node in model.graph:
        for i, value in enumerate(node.inputs):
            if value is None or id(value) in seen:
                continue
            param = find_param(value)
            if param is None or not is_float(param) or param.numel <= 1:
                continue
            seen.add(id(value))
            total += param.numel
            nbytes += param.nbytes
            if node.op_type == "Gather" and i == 0:
                embed += param.numel
    return total, nbytes, embed
