"""Evaluate one ONNX node on constant numpy inputs (for fold-constants).

Cheap common ops run in numpy directly; every other op runs through
``onnx.reference.ReferenceEvaluator`` on the serialized node. Each evaluator
returns ``None`` when it cannot say (the caller then tries the next one or
leaves the node alone); exceptions mean the same.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

Arrays = Sequence["np.ndarray | None"]
Evaluator = Callable[[ir.Node, Arrays, int], "list[np.ndarray] | None"]

#: dtypes the numpy fast path handles (others, e.g. bfloat16 or float8, go to the reference).
_PLAIN_DTYPES = frozenset(
    np.dtype(t)
    for t in (
        np.bool_,
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.uint8,
        np.uint16,
        np.uint32,
        np.uint64,
        np.float16,
        np.float32,
        np.float64,
    )
)


def evaluate(node: ir.Node, inputs: Arrays, opset: int) -> list[np.ndarray] | None:
    """The node's outputs computed from ``inputs`` (None where an input is absent)."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        fast = _NUMPY_OPS.get(node.op_type)
        if fast is not None and all(a is None or a.dtype in _PLAIN_DTYPES for a in inputs):
            try:
                result = fast(node, inputs, opset)
            except Exception:  # noqa: BLE001 - the reference evaluator may know better
                result = None
            if result is not None:
                return [np.asarray(r) for r in result]
        return evaluate_with_reference(node, inputs, opset)


def evaluate_with_reference(node: ir.Node, inputs: Arrays, opset: int) -> list[np.ndarray] | None:
    """Run the node alone in a one-node model (typed inputs let the reference
    expand ops defined as context-dependent functions, e.g. Gelu)."""
    import onnx
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    proto = ir.serde.serialize_node(node)
    input_names = ["" if a is None else f"in{i}" for i, a in enumerate(inputs)]
    output_names = [f"out{i}" for i in range(len(proto.output))]
    del proto.input[:]
    proto.input.extend(input_names)
    del proto.output[:]
    proto.output.extend(output_names)
    try:
        graph = helper.make_graph(
            [proto],
            "fold",
            [
                helper.make_tensor_value_info(name, ir.DataType.from_numpy(a.dtype).value, a.shape)
                for name, a in zip(input_names, inputs)
                if name
            ],
            [helper.make_value_info(name, onnx.TypeProto()) for name in output_names],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        evaluator = ReferenceEvaluator(model)
        feeds = {name: a for name, a in zip(input_names, inputs) if name}
        results = evaluator.run(None, feeds)
    except Exception:  # noqa: BLE001 - a node the reference cannot run is not folded
        return None
    if len(results) != len(output_names):
        return None
    return [np.asarray(r) for r in results]


# ---------------------------------------------------------------- numpy ops


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _ints_arg(node: ir.Node, inputs: Arrays, index: int, attr: str) -> list[int] | None:
    """An int list given as input ``index`` (newer opsets) or attribute ``attr``."""
    if len(inputs) > index and inputs[index] is not None:
        return [int(v) for v in np.asarray(inputs[index]).reshape(-1)]
    if attr in node.attributes:
        return list(node.attributes[attr].as_ints())
    return None


def _elementwise(fn: Callable[..., np.ndarray]) -> Evaluator:
    def run(node: ir.Node, inputs: Arrays, opset: int) -> list[np.ndarray] | None:
        if any(a is None for a in inputs):
            return None
        result = np.asarray(fn(*inputs))
        if result.dtype != inputs[0].dtype:
            return None
        return [result]

    return run


def _comparison(fn: Callable[..., np.ndarray]) -> Evaluator:
    def run(node: ir.Node, inputs: Arrays, opset: int) -> list[np.ndarray] | None:
        a, b = inputs
        return [np.asarray(fn(a, b), dtype=np.bool_)]

    return run


def _variadic(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Evaluator:
    def run(node: ir.Node, inputs: Arrays, opset: int) -> list[np.ndarray] | None:
        if not inputs or any(a is None for a in inputs):
            return None
        result = functools.reduce(fn, inputs)
        return [np.asarray(result)] if np.asarray(result).dtype == inputs[0].dtype else None

    return run


def _div(node: ir.Node, inputs: Arrays, opset: int) -> list[np.ndarray] | None:
    a, b = inputs
    if a.dtype.kind == "f":
        return [np.divide(a, b)]
    if np.any(b == 0):
        return None  # integer division by zero: leave it to the runtime
    # ONNX integer Div truncates toward zero; numpy's // floors.
    quotient = np.abs(a) // np.abs(b)
    negative = (a < 0) != (b < 0)
    return [np.where(negative, -quotient, quotient).astype(a.dtype)]


def _relu(node: ir.Node, inputs: Arrays, opset: int) -> list[np.ndarray] | None:
    (x,) = inputs
    return [np.maximum(x, np.zeros((), dtype=x.dtype))]


def _sigmoid(node: ir.Node, inputs: Arrays, opset: int) -> list[np.ndarray] | None:
    (x,) = inputs
    if x.dtype.kind != "f":
        return None
    one = np.ones((), dtype=x.dtype)
    return [(one / (one + np.exp(-x))).astype(x.dtype)]


def _cast(node: ir.Node, inputs: Arrays, opset: int) -> list[np.ndarray] | None:
    (x,) = inputs
    target = ir.DataType(_attr_int(node, "to", 0)).numpy()
    if np.dtype(target) not in _PLAIN_DTYPES:
        return None
    return [x.astype(target)]


def _reshape(node: ir.Node, inputs: Arrays, opset: int) -> list[np.ndarray] | None:
    x = inputs[0]
    shape = _ints_arg(node, inputs, 1, "shape")
    if shape is None:
        return None
    allow_zero = _attr_int(node, "allowzero", 0)
    if not allow_zero:
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [x.reshape(shape)]


def _transpose(node: ir.Node, inputs: Arrays, opset: int) -> list[np.ndarray] | None:
    (x,) = inputs
    perm = node.attributes.get("perm")
    return [np.transpose(x, None if perm is None else list(perm.as_ints()))]


def _concat(node: ir.Node, inputs: Arrays, opset: int) -> list[np.ndarray] | None:
    if any(a is None for a in inputs):
        return None
    return [np.concatenate(list(inputs), axis=_attr_int(node, "axis", 0))]


def _unsqueeze(node: ir.Node, inputs: Arrays, opset: int) -> list[np.ndarray] | None:
    axes = _ints_arg(node, inputs, 1, "axes")
    if not axes:
        return None
    return [np.expand_dims(inputs[0], tuple(axes))]


def _squeeze(node: ir.Node, inputs: Arrays, opset: int) -> list[np.ndarray] | None:
    axes = _ints_arg(node, inputs, 1, "axes")
    return [np.squeeze(inputs[0], axis=None if axes is None else tuple(axes))]


def _gather(node: ir.Node, inputs: Arrays, opset: int) -> list[np.ndarray] | None:
    data, indices = inputs
    if indices.dtype.kind not in "iu":
        return None
    return [np.take(data, indices.astype(np.int64), axis=_attr_int(node, "axis", 0))]


def _shape(node: ir.Node, inputs: Arrays, opset: int) -> list[np.ndarray] | None:
    (x,) = inputs
    start = _attr_int(node, "start", 0)
    end = node.attributes.get("end")
    dims = x.shape[start:] if end is None else x.shape[start : end.as_int()]
    return [np.array(dims, dtype=np.int64)]


def _size(node: ir.Node, inputs: Arrays, opset: int) -> list[np.ndarray] | None:
    return [np.array(inputs[0].size, dtype=np.int64)]


def _constant_of_shape(node: ir.Node, inputs: Arrays, opset: int) -> list[np.ndarray] | None:
    (shape,) = inputs
    attr = node.attributes.get("value")
    fill = np.zeros((1,), dtype=np.float32) if attr is None else attr.as_tensor().numpy()
    if fill.dtype not in _PLAIN_DTYPES or fill.size != 1:
        return None
    return [np.full([int(d) for d in shape.reshape(-1)], fill.reshape(-1)[0], dtype=fill.dtype)]


def _expand(node: ir.Node, inputs: Arrays, opset: int) -> list[np.ndarray] | None:
    x, shape = inputs
    target = np.broadcast_shapes(x.shape, tuple(int(d) for d in shape.reshape(-1)))
    return [np.broadcast_to(x, target).copy()]


def _where(node: ir.Node, inputs: Arrays, opset: int) -> list[np.ndarray] | None:
    cond, a, b = inputs
    if a.dtype != b.dtype:
        return None
    return [np.where(cond, a, b)]


def _matmul(node: ir.Node, inputs: Arrays, opset: int) -> list[np.ndarray] | None:
    a, b = inputs
    if a.dtype != b.dtype or a.dtype == np.float16 or a.dtype == np.bool_:
        return None
    return [np.matmul(a, b)]


def _slice(node: ir.Node, inputs: Arrays, opset: int) -> list[np.ndarray] | None:
    x = inputs[0]
    if opset < 10:
        starts = _ints_arg(node, (), 0, "starts")
        ends = _ints_arg(node, (), 0, "ends")
        axes = _ints_arg(node, (), 0, "axes")
        steps = None
    else:
        starts = _ints_arg(node, inputs, 1, "")
        ends = _ints_arg(node, inputs, 2, "")
        axes = _ints_arg(node, inputs, 3, "")
        steps = _ints_arg(node, inputs, 4, "")
    if starts is None or ends is None or len(starts) != len(ends):
        return None
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    if any(step <= 0 for step in steps):
        return None  # ONNX clamps negative steps differently from Python
    index = [slice(None)] * x.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[axis if axis >= 0 else axis + x.ndim] = slice(start, end, step)
    return [x[tuple(index)]]


def _flatten(node: ir.Node, inputs: Arrays, opset: int) -> list[np.ndarray] | None:
    (x,) = inputs
    axis = _attr_int(node, "axis", 1)
    axis = axis + x.ndim if axis < 0 else axis
    outer = math.prod(x.shape[:axis])
    return [x.reshape(outer, math.prod(x.shape[axis:]))]


def _unary(fn: Callable[[np.ndarray], np.ndarray], *, float_only: bool = False) -> Evaluator:
    def run(node: ir.Node, inputs: Arrays, opset: int) -> list[np.ndarray] | None:
        (x,) = inputs
        if float_only and x.dtype.kind != "f":
            return None
        result = np.asarray(fn(x))
        return [result] if result.dtype == x.dtype else None

    return run


_NUMPY_OPS: dict[str, Evaluator] = {
    "Add": _elementwise(np.add),
    "Sub": _elementwise(np.subtract),
    "Mul": _elementwise(np.multiply),
    "Div": _div,
    "And": _elementwise(np.logical_and),
    "Or": _elementwise(np.logical_or),
    "Xor": _elementwise(np.logical_xor),
    "Equal": _comparison(np.equal),
    "Less": _comparison(np.less),
    "Greater": _comparison(np.greater),
    "LessOrEqual": _comparison(np.less_equal),
    "GreaterOrEqual": _comparison(np.greater_equal),
    "Sum": _variadic(np.add),
    "Max": _variadic(np.maximum),
    "Min": _variadic(np.minimum),
    "Neg": _unary(np.negative),
    "Abs": _unary(np.abs),
    "Not": _unary(np.logical_not),
    "Identity": _unary(np.copy),
    "Sign": _unary(np.sign),
    "Floor": _unary(np.floor, float_only=True),
    "Ceil": _unary(np.ceil, float_only=True),
    "Sqrt": _unary(np.sqrt, float_only=True),
    "Exp": _unary(np.exp, float_only=True),
    "Log": _unary(np.log, float_only=True),
    "Tanh": _unary(np.tanh, float_only=True),
    "Reciprocal": _unary(np.reciprocal, float_only=True),
    "Relu": _relu,
    "Sigmoid": _sigmoid,
    "Cast": _cast,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Concat": _concat,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Gather": _gather,
    "Shape": _shape,
    "Size": _size,
    "ConstantOfShape": _constant_of_shape,
    "Expand": _expand,
    "Where": _where,
    "MatMul": _matmul,
    "Slice": _slice,
    "Flatten": _flatten,
}
