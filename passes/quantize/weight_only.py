"""Weight-only quantization (w8, w4) and the weight walk GPTQ and AWQ share.

Quantizable weights are initializers feeding MatMul (rank-2 B), Gemm (B),
Conv (W) and Gather (embedding tables, axis 0). Their layout decides the
quantization axis: per output channel for 8 bits, blocks along the reduction
(input) dimension for 4 bits, so a block's scale multiplies one dot-product run.
A weight shared by several nodes is quantized once; every user reads the same
DequantizeLinear.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from compiler.ir.quant import QuantRecord
from passes.quantize import numerics
from passes.quantize.core import LayerRecord, QuantContext, ensure_node_names
from passes.quantize.rewrite import BLOCKED_OPSET, dequantize_node, ensure_opset

#: weights with fewer elements stay float (biases, norms, tiny projections)
MIN_ELEMENTS = 256


@dataclasses.dataclass
class WeightUse:
    """A quantizable weight and how its consumers read it."""

    value: ir.Value
    consumer: ir.Node  # the consumer that decides the layout (the first MatMul/Gemm/Conv, else the Gather)
    kind: str  # "matmul" | "conv" | "gather"
    channel_axis: int  # the output-channel axis (per-channel scales)
    reduce_axis: int  # the reduction axis (blocks run along it)

    @property
    def array(self) -> np.ndarray:
        return self.value.const_value.numpy()


def find_weights(model: ir.Model, *, embeddings: bool = True, kinds: tuple[str, ...] = ("matmul", "conv", "gather"),
                 min_elements: int = MIN_ELEMENTS) -> list[WeightUse]:
    """The quantizable weights of the main graph, in graph order of their deciding consumer."""
    found: dict[str, WeightUse] = {}
    rank = {"matmul": 0, "conv": 0, "gather": 1}
    for node in model.graph:
        use = _classify(node)
        if use is None:
            continue
        value, kind, channel, reduce = use
        if kind not in kinds or (kind == "gather" and not embeddings):
            continue
        tensor = value.const_value
        if tensor is None or value.is_graph_input() or tensor.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            continue
        if tensor.size < min_elements:
            continue
        prev = found.get(value.name)
        if prev is None or rank[kind] < rank[prev.kind]:
            found[value.name] = WeightUse(value, node, kind, channel, reduce)
    return list(found.values())


def _classify(node: ir.Node) -> tuple[ir.Value, str, int, int] | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    op, ins = node.op_type, node.inputs
    if op == "MatMul" and len(ins) == 2 and _is_const(ins[1]) and len(ins[1].const_value.shape) == 2:
        return ins[1], "matmul", 1, 0
    if op == "Gemm" and len(ins) >= 2 and _is_const(ins[1]):
        trans_b = node.attributes.get_int("transB", 0)
        return ins[1], "matmul", (0 if trans_b else 1), (1 if trans_b else 0)
    if op == "Conv" and len(ins) >= 2 and _is_const(ins[1]) and len(ins[1].const_value.shape) >= 3:
        return ins[1], "conv", 0, 1
    if op == "Gather" and _is_const(ins[0]) and node.attributes.get_int("axis", 0) == 0 \
            and len(ins[0].const_value.shape) == 2:
        return ins[0], "gather", 0, 1
    return None


def _is_const(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.is_initializer()


#: A solver turns (weight use, scheme) into (codes, scale, zero); the default rounds to nearest.
Solver = Callable[[WeightUse, Any], tuple[np.ndarray, np.ndarray, "np.ndarray | None"]]


def layout(use: WeightUse, scheme: Any) -> tuple[int, int]:
    """(axis, block_size) in DequantizeLinear terms for this weight under ``scheme``."""
    if scheme.block_size > 0:
        return use.reduce_axis, scheme.block_size
    return use.channel_axis, 0


def round_to_nearest(use: WeightUse, scheme: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    axis, block = layout(use, scheme)
    return numerics.quantize_weight(use.array.astype(np.float32), bits=scheme.bits, axis=axis, block_size=block,
                                    symmetric=scheme.symmetric)


def apply(scheme: Any, model: ir.Model, ctx: QuantContext, solver: Solver | None = None,
          label: str = "quantizing weights") -> list[LayerRecord]:
    """Quantize every eligible weight with ``solver`` (round-to-nearest by default)."""
    if scheme.bits == 4 or getattr(scheme, "block_size", 0) > 0:
        ensure_opset(model, BLOCKED_OPSET)
    ensure_node_names(model.graph)
    uses = find_weights(model, embeddings=getattr(scheme, "embeddings", True))
    solver = solver or round_to_nearest
    records = []
    with ctx.progress(label, len(uses)) as bar:
        for use in uses:
            bar.update(1, use.value.name)
            records.append(quantize_use(model, use, scheme, ctx, solver))
    return records


def quantize_use(model: ir.Model, use: WeightUse, scheme: Any, ctx: QuantContext, solver: Solver) -> LayerRecord:
    node = use.consumer
    before = use.value.const_value.nbytes
    base = LayerRecord(node=node.name, op=node.op_type, scheme="float32", output=node.outputs[0].name,
                       weight=use.value.name, bytes_before=before, bytes_after=before)
    if node.name in ctx.exclude:
        base.note = "kept in float (accuracy budget)"
        return base
    axis, block = layout(use, scheme)
    q, scale, zero = solver(use, scheme)
    record = QuantRecord(scheme=scheme.name, bits=scheme.bits, block_size=block, axis=axis,
                         symmetric=scheme.symmetric, zero_dtype=None if scheme.symmetric else "uint8")
    dtype = use.value.const_value.dtype
    graph = model.graph
    first = min((u.node for u in use.value.uses()), key=_position(graph))
    out = dequantize_node(graph, first, use.value.name, q, scale, zero, axis=axis, block_size=block, record=record)
    if dtype != ir.DataType.FLOAT:  # float16 weights: dequantize to float, cast back
        cast = ir.Node("", "Cast", [out], [ir.AttrInt64("to", dtype.value)], name=f"{out.name}_cast")
        cast.outputs[0].name = f"{out.name}_{dtype.name.lower()}"
        cast.outputs[0].type = ir.TensorType(dtype)
        graph.insert_before(first, cast)
        out = cast.outputs[0]
    use.value.replace_all_uses_with(out)
    graph.initializers.pop(use.value.name, None)
    after = q.size * scheme.bits // 8 + scale.size * 4 + (0 if zero is None else -(-zero.size * scheme.bits // 8))
    base.scheme, base.bytes_after = scheme.spec(), after
    return base


def _position(graph: ir.Graph) -> Callable[[ir.Node], int]:
    order = {id(n): i for i, n in enumerate(graph)}
    return lambda n: order.get(id(n), 1 << 62)
