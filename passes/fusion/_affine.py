"""Per-channel affine maps (y = scale * x + shift) that the weight-folding
rules move into Conv / ConvTranspose / Gemm / MatMul weights and biases.

Arithmetic is done in float64 and cast back to the weight's dtype once.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from passes.fusion._rules import RewriteContext, attr_float, attr_int, input_at

FLOAT_DTYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
)

#: Binary ops that are affine in one operand when the other is constant.
AFFINE_OPS = ("Add", "Sub", "Mul", "Div")
SHIFT_OPS = ("Add", "Sub")
SCALE_OPS = ("Mul", "Div")


@dataclasses.dataclass
class Affine:
    """``y = scale * x + shift``; either part may be absent. Arrays keep the
    constant operand's shape (broadcasting against x), in float64."""

    scale: np.ndarray | None = None
    shift: np.ndarray | None = None


def f64(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float64)


def cast_to(array: np.ndarray, dtype: ir.DataType) -> np.ndarray:
    return np.asarray(array).astype(dtype.numpy())


def float_dtype_problem(tensor: ir.TensorProtocol, what: str) -> str | None:
    if tensor.dtype not in FLOAT_DTYPES:
        return f"{what} has dtype {tensor.dtype.name}; only floating-point weights are folded"
    return None


def binary_affine(op: ir.Node, x_index: int, constant: np.ndarray) -> Affine | str:
    """The affine map ``op`` applies to its input ``x_index`` when the other
    input is ``constant``; a reason when it is not affine in that input."""
    c = f64(constant)
    kind = op.op_type
    if kind == "Add":
        return Affine(shift=c)
    if kind == "Sub":
        return Affine(shift=-c) if x_index == 0 else Affine(scale=np.array(-1.0), shift=c)
    if kind == "Mul":
        return Affine(scale=c)
    if kind == "Div":
        if x_index != 0:
            return "Div divides a constant by the value (not affine)"
        if not np.all(c != 0):
            return "the Div divisor has zeros"
        return Affine(scale=1.0 / c)
    return f"{kind} is not an affine op"


def channel_vector(
    c: np.ndarray, rank: int, axis: int, channels: int, what: str
) -> np.ndarray | str:
    """``c``, broadcast against a value of ``rank`` dims, as a [channels]
    vector when it varies along ``axis`` only; else a reason.

    Refuses constants whose broadcast would enlarge the value (higher rank or
    more entries along an axis), so folding never changes a shape.
    """
    if c.ndim > rank:
        return f"{what} has rank {c.ndim}, more than the {rank} dims it applies to"
    shape = (1,) * (rank - c.ndim) + tuple(c.shape)
    for i, dim in enumerate(shape):
        if i == axis:
            if dim not in (1, channels):
                return f"{what} has {dim} entries along the channel axis, expected {channels} or 1"
        elif dim != 1:
            return f"{what} is not per-channel (it varies along axis {i - rank})"
    return np.broadcast_to(f64(c).reshape(-1), (channels,)).copy()


def batchnorm_affine(bn: ir.Node, ctx: RewriteContext, channels: int) -> Affine | str:
    """BatchNormalization in inference mode as an affine map over ``channels``
    (the channel axis is 1); a reason when it is in training mode, its
    statistics outputs are used, or its parameters are not constant."""
    opset = ctx.opset
    if opset < 7 and attr_int(bn, "is_test", 0) != 1:
        return "BatchNormalization is in training mode (is_test=0)"
    if opset < 9 and attr_int(bn, "spatial", 1) != 1:
        return "BatchNormalization normalizes per activation (spatial=0)"
    if attr_int(bn, "training_mode", 0) != 0:
        return "BatchNormalization is in training mode (training_mode=1)"
    if any(v.uses() or v.is_graph_output() for v in bn.outputs[1:]):
        return "BatchNormalization statistics outputs are used"
    params = []
    for index, label in enumerate(("scale", "bias", "mean", "variance"), start=1):
        array = ctx.array(input_at(bn, index))
        if array is None:
            return f"BatchNormalization {label} is not constant"
        array = f64(array).reshape(-1) if array.size in (1, channels) else None
        if array is None:
            return f"BatchNormalization {label} does not have {channels} channels"
        params.append(np.broadcast_to(array, (channels,)))
    scale, bias, mean, var = params
    eps = attr_float(bn, "epsilon", 1e-5)
    factor = scale / np.sqrt(var + eps)
    return Affine(scale=factor, shift=bias - mean * factor)


def input_broadcast_problem(
    x: "ir.Value", c: np.ndarray, rank: int | None, axis: int, channels: int, what: str
) -> str | None:
    """A reason when ``x ⊙ c`` (``c`` a per-channel constant, ``axis`` counted
    from the end) could be larger than ``x`` itself; folding ``c`` into the
    next node's weights needs the node to see exactly ``x``'s shape.

    ``rank`` is the rank the consumer needs (None: any rank works).
    """
    if c.size == 1 and c.ndim <= 1:
        return None
    shape = x.shape
    if shape is None:
        return f"the shape of the {what} input is unknown"
    if rank is not None and len(shape) != rank:
        return f"the {what} input has rank {len(shape)}, the consumer needs {rank}"
    if c.ndim > len(shape):
        return f"the {what} constant has more dims than its input"
    channel_dim = c.shape[axis] if c.ndim >= -axis else 1
    if channel_dim != 1 and shape[axis] != channels:
        return f"the {what} input does not have {channels} channels (the constant would broadcast it)"
    return None
