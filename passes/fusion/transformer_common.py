"""Matching helpers shared by the transformer fusions (norms, activations, attention).

The fusions are :mod:`passes.fusion._rules` rules: ``match`` walks the
decomposed subgraph by hand from its anchor (with both operand orders of the
commutative ops), ``check`` gives the reason a match is not fused, and
``rewrite`` puts the fused node at the position of the last node it replaces.
Every value a fusion swallows must be used only inside the matched subgraph
and be no graph output (:func:`inside_only`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from passes.cleanup import _graphs

#: Domain of onnxruntime's contrib ops.
MS_DOMAIN = "com.microsoft"

FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


def producer(value: ir.Value | None, *op_types: str) -> ir.Node | None:
    """The standard-domain node producing ``value`` when its op is one of ``op_types``."""
    if value is None:
        return None
    node = value.producer()
    if node is None or node.graph is None or not _graphs.is_standard(node):
        return None
    if op_types and node.op_type not in op_types:
        return None
    return node


def binary(node: ir.Node | None) -> tuple[ir.Value, ir.Value] | None:
    if node is None or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    a, b = node.inputs
    if a is None or b is None:
        return None
    return a, b


def split(node: ir.Node | None, first_op: str) -> tuple[ir.Node, ir.Value] | None:
    """For a commutative binary node: (the operand's producer of type ``first_op``, the other operand)."""
    operands = binary(node)
    if operands is None:
        return None
    for i in (0, 1):
        found = producer(operands[i], first_op)
        if found is not None:
            return found, operands[1 - i]
    return None


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    tensor = _graphs.constant_tensor(value)
    if tensor is None:
        return None
    try:
        return tensor.numpy()
    except Exception:  # noqa: BLE001 - unreadable data: not a usable constant
        return None


def scalar(value: ir.Value | None) -> float | None:
    """A one-element constant (rank 0 or 1) as a float."""
    array = constant_array(value)
    if array is None or array.size != 1 or array.ndim > 1 or array.dtype.kind not in "fiu":
        return None
    return float(array.reshape(()))


def is_scalar(value: ir.Value | None, expected: float, rel: float = 1e-3) -> bool:
    got = scalar(value)
    return got is not None and math.isclose(got, expected, rel_tol=rel, abs_tol=1e-12)


def scalar_operand(node: ir.Node, expected: float, rel: float = 1e-3) -> ir.Value | None:
    """For a commutative binary node with one operand the constant ``expected``: the other one."""
    operands = binary(node)
    if operands is None:
        return None
    a, b = operands
    if is_scalar(b, expected, rel):
        return a
    if is_scalar(a, expected, rel):
        return b
    return None


def inside_only(values: Iterable[ir.Value], nodes: Iterable[ir.Node]) -> str | None:
    """A reason when one of ``values`` is used outside ``nodes`` or is a graph output."""
    inside = set(nodes)
    for value in values:
        if value.is_graph_output():
            return f"intermediate value {value.name!r} is a graph output"
        for user, _ in value.uses():
            if user not in inside:
                return f"intermediate value {value.name!r} has another user ({user.op_type})"
    return None


def interior_problem(nodes: Sequence[ir.Node], keep: ir.Node) -> str | None:
    """A reason when a value computed inside a matched region (every output of
    ``nodes`` but those of ``keep``, whose outputs the fused op takes over) is
    used outside it: fusing would then drop a value someone still needs."""
    return inside_only([v for n in nodes if n is not keep for v in n.outputs], nodes)


def sole_user(value: ir.Value) -> ir.Node | None:
    """The only node using ``value`` (once), when it is no graph output."""
    if value.is_graph_output():
        return None
    uses = list(value.uses())
    if len(uses) != 1:
        return None
    return uses[0][0]


def dtype(value: ir.Value | None) -> ir.DataType | None:
    if value is None or value.type is None:
        return None
    return value.dtype


def dims(value: ir.Value | None) -> tuple | None:
    """The dims when the rank is known: ints, symbolic names, or None for unknown."""
    if value is None or value.shape is None:
        return None
    out = []
    for d in value.shape:
        if isinstance(d, int):
            out.append(d)
        else:
            out.append(d.value if getattr(d, "value", None) is not None else None)
    return tuple(out)


def rank(value: ir.Value | None) -> int | None:
    d = dims(value)
    return None if d is None else len(d)


def same_dims(a: Sequence | None, b: Sequence | None) -> bool:
    """Dims known equal: equal ints, or the same symbolic name."""
    if a is None or b is None or len(a) != len(b):
        return False
    return all(x is not None and x == y for x, y in zip(a, b))


def reduce_axes(node: ir.Node) -> tuple[list[int] | None, int]:
    """(axes, keepdims) of a Reduce* node; axes from the attribute (opset < 18) or
    the constant second input, None when absent or not constant."""
    attr = node.attributes.get("keepdims")
    keepdims = 1 if attr is None else int(attr.as_int())
    axes_attr = node.attributes.get("axes")
    if axes_attr is not None:
        return [int(a) for a in axes_attr.as_ints()], keepdims
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        return _graphs.constant_ints(node.inputs[1]), keepdims
    return None, keepdims


def trailing_axes(axes: list[int] | None, x: ir.Value) -> int | None:
    """k when ``axes`` are exactly the last k axes of ``x``, else None."""
    if not axes:
        return None
    d = known_dims(x)
    r = None if d is None else len(d)
    normalized = []
    for a in axes:
        if a < 0:
            normalized.append(a)
        elif r is not None:
            normalized.append(a - r)
        else:
            return None
    k = len(normalized)
    if sorted(normalized) != list(range(-k, 0)) or (r is not None and k > r):
        return None
    return k


def scoped(node: ir.Node, what: str) -> str:
    """A name for a node made from ``node``: its scope ("/model/layers.0/attn") + ``what``."""
    name = node.name or ""
    return f"{name.rsplit('/', 1)[0]}/{what}" if "/" in name else what


def opset_of(ctx) -> int:
    return int(ctx.opset or 0)


def attr_float(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.as_float())


def attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.as_int())


def attrs(**values) -> list[ir.Attr]:
    """ir.Attr list from Python values (int, float, str, list of ints)."""
    return [ir.convenience.convert_attribute(k, v) for k, v in values.items() if v is not None]


def replace(ctx, old_nodes: Sequence[ir.Node], old: Sequence[ir.Value], new: Sequence[ir.Value]) -> None:
    """Forward each ``old`` value to its ``new`` one, then remove ``old_nodes``
    (each once its outputs are unused: the callers checked they are used only
    inside ``old_nodes``)."""
    for o, n in zip(old, new):
        if o.type is not None and n.type is None:
            n.type = o.type
        if o.shape is not None and n.shape is None:
            n.shape = o.shape
        ctx.forward(o, n)
    pending = [n for n in dict.fromkeys(old_nodes) if not ctx.is_dead(n)]
    while pending:
        left = []
        for node in reversed(pending):
            if any(v.uses() or v.is_graph_output() for v in node.outputs):
                left.append(node)
            else:
                ctx.kill(node)
        if len(left) == len(pending):
            raise AssertionError("fusion bug: replaced nodes still in use")
        pending = left[::-1]


#: Ops whose (first) output has the dtype of their first input.
_SAME_DTYPE_OPS = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Pow", "Neg", "Abs", "Relu", "Sigmoid", "Tanh", "Erf", "Sqrt",
        "Reciprocal", "Exp", "Softmax", "MatMul", "Gemm", "Reshape", "Transpose", "Squeeze",
        "Unsqueeze", "Flatten", "Expand", "Slice", "Split", "Concat", "Identity", "ReduceMean",
        "LayerNormalization", "Gelu", "FastGelu", "QuickGelu", "BiasGelu",
        "MultiHeadAttention", "Attention", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
    }
)


def known_dtype(value: ir.Value | None, depth: int = 32) -> ir.DataType | None:
    """The value's dtype, from its type or, when that is missing (onnx shape
    inference stops at contrib ops), from a dtype-preserving chain of producers."""
    while value is not None and depth > 0:
        if value.type is not None:
            return value.dtype
        node = value.producer()
        if node is None or not node.inputs:
            return None
        if node.op_type == "Cast":
            to = node.attributes.get("to")
            return None if to is None else ir.DataType(to.as_int())
        if node.op_type == "Gather":
            value = node.inputs[0]
        elif node.op_type == "Where" and len(node.inputs) == 3:
            value = node.inputs[1]
        elif node.op_type in ("SimplifiedLayerNormalization", "RMSNormalization"):
            value = node.inputs[1]
        elif node.op_type in _SAME_DTYPE_OPS:
            value = node.inputs[0]
        else:
            return None
        depth -= 1
    return None


#: Ops whose (first) output has the shape of their first input.
_SAME_SHAPE_OPS = frozenset(
    {
        "Cast", "Neg", "Abs", "Relu", "Sigmoid", "Tanh", "Erf", "Sqrt", "Reciprocal", "Exp",
        "Softmax", "Identity", "LayerNormalization", "SimplifiedLayerNormalization",
        "RMSNormalization", "Gelu", "FastGelu", "QuickGelu", "BiasGelu",
        "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "MultiHeadAttention",
    }
)
_BROADCAST_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Where"})


#: How many producers one ``known_dims`` call may look at (keeps each check O(1)).
_DIMS_BUDGET = 64


def known_dims(value: ir.Value | None, depth: int = 24, _memo: dict | None = None) -> tuple | None:
    """The value's dims, from its shape or, when that is missing (onnx shape
    inference stops at contrib ops), derived through shape-preserving producers,
    broadcasting elementwise ops, Reshape and MatMul by a 2-D constant. Looks at
    no more than ``_DIMS_BUDGET`` producers (memoized), so a check stays cheap."""
    if value is None:
        return None
    found = dims(value)
    if found is not None or depth <= 0:
        return found
    memo = {"budget": _DIMS_BUDGET} if _memo is None else _memo
    if value in memo:
        return memo[value]
    memo["budget"] -= 1
    if memo["budget"] < 0:
        return None
    memo[value] = result = _derive_dims(value, depth, memo)
    return result


def _derive_dims(value: ir.Value, depth: int, memo: dict) -> tuple | None:
    node = value.producer()
    if node is None or not node.inputs:
        return None
    op = node.op_type
    if op in _SAME_SHAPE_OPS:
        return known_dims(node.inputs[0], depth - 1, memo)
    if op in _BROADCAST_OPS:
        shapes = [known_dims(v, depth - 1, memo) for v in node.inputs if v is not None]
        if any(s is None for s in shapes):
            return None
        r = max(len(s) for s in shapes)
        out = []
        for i in range(r):
            column = [s[i - r + len(s)] for s in shapes if i - r + len(s) >= 0]
            known = [d for d in column if d != 1]
            if not known:
                out.append(1)
            elif all(d is not None and d == known[0] for d in known):
                out.append(known[0])
            else:
                out.append(None)
        return tuple(out)
    if op == "Reshape" and len(node.inputs) == 2 and attr_int(node, "allowzero", 0) == 0:
        target = shape_entries(node.inputs[1])
        source = known_dims(node.inputs[0], depth - 1, memo)
        if target is None:
            return None
        out = []
        for i, entry in enumerate(target):
            if entry is None:
                out.append(None)
            elif entry == 0:
                out.append(source[i] if source is not None and i < len(source) else None)
            else:
                out.append(entry if entry > 0 else None)
        if -1 in target and None not in target and source is not None and all(isinstance(d, int) for d in source):
            known = [d for d in out if isinstance(d, int)]
            if len(known) == len(out) - 1 and all(known):
                out[target.index(-1)] = int(np.prod(source)) // int(np.prod(known))
        return tuple(out)
    if op == "MatMul" and len(node.inputs) == 2:
        a = known_dims(node.inputs[0], depth - 1, memo)
        w = _graphs.constant_tensor(node.inputs[1])
        if a is not None and len(a) >= 2 and w is not None and len(w.shape) == 2:
            return (*a[:-1], int(w.shape[1]))
    return None


def _is_scalar_value(value: ir.Value | None) -> bool:
    """Known to have rank 0 (from its shape, or a Gather at a scalar index)."""
    d = dims(value)
    if d is not None:
        return d == ()
    gather = producer(value, "Gather")
    if gather is None or len(gather.inputs) != 2:
        return False
    index = _graphs.constant_tensor(gather.inputs[1])
    source = dims(gather.inputs[0])
    one_d = (source is not None and len(source) == 1) or producer(gather.inputs[0], "Shape") is not None
    return index is not None and len(index.shape) == 0 and one_d


def shape_entries(shape: ir.Value | None) -> list | None:
    """The entries of a 1-D shape tensor: ints where constant, None where computed
    (a constant, or a Concat of constants and 1-element computed pieces)."""
    if shape is None:
        return None
    values = _graphs.constant_ints(shape)
    if values is not None:
        return list(values)
    concat = producer(shape, "Concat")
    if concat is None:
        return None
    entries: list = []
    for piece in concat.inputs:
        values = _graphs.constant_ints(piece)
        if values is not None:
            entries.extend(values)
            continue
        d = known_dims(piece)
        if d is None or len(d) != 1 or not isinstance(d[0], int):
            unsqueeze = producer(piece, "Unsqueeze")
            if unsqueeze is None or not _is_scalar_value(unsqueeze.inputs[0]):
                return None
            entries.append(None)  # Unsqueeze of a scalar: one entry
            continue
        entries.extend([None] * d[0])
    return entries
