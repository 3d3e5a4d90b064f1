"""Graph edits shared by the schemes: new initializers, DequantizeLinear of weights, opset upgrades."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from compiler.errors import UnsupportedError
from compiler.ir.quant import QuantRecord, set_quant

#: DequantizeLinear with block_size and int4/uint4 inputs exist from opset 21.
BLOCKED_OPSET = 21


def unique_name(graph: ir.Graph, hint: str) -> str:
    taken = _names(graph)
    if hint not in taken:
        return hint
    i = 1
    while f"{hint}_{i}" in taken:
        i += 1
    return f"{hint}_{i}"


def _names(graph: ir.Graph) -> set[str]:
    names = {v.name for v in graph.inputs} | set(graph.initializers)
    for node in graph:
        names.update(o.name for o in node.outputs if o.name)
    return names


def add_initializer(graph: ir.Graph, hint: str, array: np.ndarray) -> ir.Value:
    """A new initializer holding ``array`` (int4/uint4 when its dtype is ml_dtypes.int4/uint4)."""
    name = unique_name(graph, hint)
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def as_storage(q: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    """Integer codes in the ONNX storage type: int4/uint4 for 4 bits, int8/uint8 for 8."""
    if bits == 4:
        return q.astype(ml_dtypes.int4 if symmetric else ml_dtypes.uint4)
    if bits == 8:
        return q.astype(np.int8 if symmetric else np.uint8)
    raise UnsupportedError(f"no ONNX storage type for {bits}-bit codes")


def dequantize_node(
    graph: ir.Graph, before: ir.Node, weight_name: str, q: np.ndarray, scale: np.ndarray,
    zero: np.ndarray | None, *, axis: int, block_size: int, record: QuantRecord, out_dtype: ir.DataType = ir.DataType.FLOAT,
) -> ir.Value:
    """Insert ``DequantizeLinear(q, scale, zero)`` before ``before``; returns its float output.

    The integer initializer keeps ``weight_name`` (suffixed ``_quantized``) and carries the QuantRecord.
    """
    qv = add_initializer(graph, f"{weight_name}_quantized", as_storage(q, record.bits, record.symmetric))
    set_quant(qv, record)
    sv = add_initializer(graph, f"{weight_name}_scale", np.asarray(scale, dtype=np.float32))
    inputs = [qv, sv]
    if zero is not None:
        inputs.append(add_initializer(graph, f"{weight_name}_zero", as_storage(np.asarray(zero), record.bits, False)))
    attrs = []
    if block_size > 0:
        attrs = [ir.AttrInt64("axis", axis), ir.AttrInt64("block_size", block_size)]
    elif block_size == 0:
        attrs = [ir.AttrInt64("axis", axis)]
    node = ir.Node("", "DequantizeLinear", inputs, attrs, name=unique_node_name(graph, f"{weight_name}_dequantize"),
                   num_outputs=1)
    out = node.outputs[0]
    out.name = unique_name(graph, f"{weight_name}_dequantized")
    out.type = ir.TensorType(out_dtype)
    out.shape = ir.Shape(q.shape)
    graph.insert_before(before, node)
    return out


def unique_node_name(graph: ir.Graph, hint: str) -> str:
    taken = {n.name for n in graph}
    if hint not in taken:
        return hint
    i = 1
    while f"{hint}_{i}" in taken:
        i += 1
    return f"{hint}_{i}"


def opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))


def ensure_opset(model: ir.Model, version: int) -> bool:
    """Upgrade the default-domain opset to at least ``version`` in place (onnx's version converter).

    Returns whether the model changed. Raises UnsupportedError when the converter cannot.
    """
    if opset(model) >= version:
        return False
    import onnx
    import onnx.version_converter

    proto = ir.to_proto(model)
    try:
        converted = onnx.version_converter.convert_version(proto, version)
    except Exception as err:  # the converter raises bare RuntimeErrors with long C++ messages
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise UnsupportedError(
            f"cannot upgrade the model from opset {opset(model)} to {version} (needed for int4 DequantizeLinear): {first}"
        ) from None
    new = ir.from_proto(converted)
    model.ir_version = max(model.ir_version or 0, new.ir_version or 0)
    model.graph = new.graph  # type: ignore[misc]  (opset_imports live on the graph)
    model.functions.clear()
    model.functions.update(new.functions)
    return True
