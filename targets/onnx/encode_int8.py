"""Re-encode kiln's 8-bit weight-only DequantizeLinear so onnxruntime runs it no slower than float32.

The quantize stage leaves 8-bit weight-only weights (``w8``, and the embedding
tables of ``int8-dynamic``) as ``DequantizeLinear`` of an int8/uint8
initializer, per tensor or per channel, read by a MatMul / Gemm / Conv weight
input or by a Gather. onnxruntime 1.32 (CPU) runs that form badly:

- ``DequantizeLinear -> MatMul`` is rewritten at session creation into
  ``MatMulNBits(bits=8, block_size=32, accuracy_level=4)``: activations are
  quantized per block (different numbers from the canonical form), and on
  all-MiniLM-L6-v2 (batch 16 x 32 tokens, 1 thread, x86 AVX2) it took 234 ms
  against 148 ms for float32. Explicit MatMulNBits bits=8 measured 173-236 ms
  there (block 32/128/256, accuracy level 0 or 4). It only wins on one-row
  matmuls (decode: 0.24 vs 0.75 ms for 1 x 2048 x 2048).
- ``DequantizeLinear -> Gather`` is neither fused nor constant-folded: the whole
  table is dequantized on every run.

This module rewrites, keeping every value name:

- weight of MatMul / Gemm / Conv: ``Cast(q) [- zero] * scale``, an all-constant
  subgraph that onnxruntime folds at session creation into the float32 weight:
  float32 speed, and bit-for-bit the canonical form's math (151 ms on the
  MiniLM case above). The file stays int8; the session holds float32 weights.
- Gather table (axis 0): ``Cast(Gather(q, ids)) [- zero] * scale`` with the
  per-row scale (and zero) gathered by the same ids: only the gathered rows are
  dequantized, and the table stays int8 in memory.

A DequantizeLinear whose consumer also reads a dequantized activation is part
of a static-int8 QDQ group that onnxruntime fuses into integer kernels: it is
left alone, as is anything blocked (int4 has its own encoder) or mixed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from passes.quantize.rewrite import add_initializer, unique_name


@dataclasses.dataclass
class Int8EncodeReport:
    folded_weights: int = 0  # DequantizeLinear -> Cast/Sub/Mul for MatMul/Gemm/Conv weights
    gathered_tables: int = 0  # DequantizeLinear -> Gather rewritten to dequantize the gathered rows
    kept: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"folded_weights": self.folded_weights, "gathered_tables": self.gathered_tables}
        if self.kept:
            out["kept_qdq"] = self.kept
        return out


_WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1}


def encode_int8_weights(model: ir.Model) -> Int8EncodeReport:
    """Rewrite every eligible 8-bit weight-only DequantizeLinear of the main graph, in place."""
    report = Int8EncodeReport()
    graph = model.graph
    for dq in [n for n in graph if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx")]:
        weight = _weight_operands(dq)
        if weight is None:
            continue
        users = list(dq.outputs[0].uses())
        if not users or dq.outputs[0].is_graph_output():
            continue
        kinds = {_kind(u.node, u.idx, weight) for u in users}
        if kinds == {"weight"}:
            _fold_weight(graph, dq, weight)
            report.folded_weights += 1
        elif kinds == {"gather"}:
            for use in users:
                _gather_rows(graph, use.node, dq, weight)
            _drop(graph, dq)
            report.gathered_tables += 1
        elif kinds != {"qdq"}:
            report.kept.append(f"{dq.name}: " + ", ".join(sorted(k for k in kinds if k not in ("weight", "gather"))
                                                         or ["mixed readers"]))
    return report


@dataclasses.dataclass
class _Weight:
    q: ir.Value
    scale: ir.Value
    zero: ir.Value | None
    axis: int | None  # None: per tensor


def _const(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.is_initializer() and not value.is_graph_input()


def _weight_operands(dq: ir.Node) -> _Weight | None:
    ins = list(dq.inputs) + [None] * (3 - len(dq.inputs))
    q, scale, zero = ins[0], ins[1], ins[2]
    if not (_const(q) and _const(scale)) or (zero is not None and not _const(zero)):
        return None
    if q.const_value.dtype not in (ir.DataType.INT8, ir.DataType.UINT8) or scale.const_value.dtype != ir.DataType.FLOAT:
        return None
    if dq.attributes.get_int("block_size", 0) > 0:
        return None
    rank = len(q.const_value.shape)
    if len(scale.const_value.shape) == 0 or scale.const_value.size == 1:
        return _Weight(q, scale, zero, None)
    if len(scale.const_value.shape) != 1:
        return None
    return _Weight(q, scale, zero, dq.attributes.get_int("axis", 1) % rank)


def _kind(node: ir.Node, index: int, weight: _Weight) -> str:
    if node.domain not in ("", "ai.onnx"):
        return f"read by {node.domain}::{node.op_type}"
    if _WEIGHT_INPUT.get(node.op_type) == index:
        activation = node.inputs[0]
        producer = activation.producer() if activation is not None else None
        return "qdq" if producer is not None and producer.op_type == "DequantizeLinear" else "weight"
    if node.op_type == "Gather" and index == 0 and len(weight.q.const_value.shape) == 2 \
            and node.attributes.get_int("axis", 0) == 0:
        return "gather"
    return f"read by {node.op_type} input {index}"


def _fold_weight(graph: ir.Graph, dq: ir.Node, w: _Weight) -> None:
    """DequantizeLinear -> Cast [-> Sub zero] -> Mul scale, the last output keeping the DQ output's name."""
    shape = list(w.q.const_value.shape)
    view = [1] * len(shape)
    if w.axis is not None:
        view[w.axis] = shape[w.axis]
    scale = add_initializer(graph, f"{w.scale.name}_b", w.scale.const_value.numpy().astype(np.float32).reshape(
        view if w.axis is not None else ()))
    nodes = [_node(graph, "Cast", [w.q], dq.name, "cast", [ir.AttrInt64("to", ir.DataType.FLOAT.value)])]
    if w.zero is not None:
        zero = add_initializer(graph, f"{w.zero.name}_f", w.zero.const_value.numpy().astype(np.float32).reshape(
            view if w.axis is not None else ()))
        nodes.append(_node(graph, "Sub", [nodes[-1].outputs[0], zero], dq.name, "sub_zero"))
    nodes.append(_node(graph, "Mul", [nodes[-1].outputs[0], scale], dq.name, "scale"))
    _replace(graph, dq, nodes)


def _gather_rows(graph: ir.Graph, gather: ir.Node, dq: ir.Node, w: _Weight) -> None:
    """Gather(DQ(q), ids) -> Cast(Gather(q, ids)) [- zero] * scale, per-row parameters gathered by the same ids."""
    ids = gather.inputs[1]
    rows = w.axis == 0

    def param(value: ir.Value, suffix: str) -> ir.Value:
        array = value.const_value.numpy().astype(np.float32)
        if w.axis is None:
            return add_initializer(graph, f"{value.name}_{suffix}", array.reshape(()))
        if not rows:  # per column: broadcasts over the gathered rows as it is
            return add_initializer(graph, f"{value.name}_{suffix}", array.reshape(-1))
        table = add_initializer(graph, f"{value.name}_{suffix}", array.reshape(-1, 1))
        picked = _node(graph, "Gather", [table, ids], gather.name, f"gather_{suffix}", [ir.AttrInt64("axis", 0)])
        nodes.append(picked)
        return picked.outputs[0]

    nodes = [_node(graph, "Gather", [w.q, ids], gather.name, "gather_codes", [ir.AttrInt64("axis", 0)])]
    nodes.append(_node(graph, "Cast", [nodes[-1].outputs[0]], gather.name, "cast", [ir.AttrInt64("to", ir.DataType.FLOAT.value)]))
    codes = nodes[-1].outputs[0]
    if w.zero is not None:
        zero = param(w.zero, "zero_rows")
        nodes.append(_node(graph, "Sub", [codes, zero], gather.name, "sub_zero"))
        codes = nodes[-1].outputs[0]
    scale = param(w.scale, "scale_rows")
    nodes.append(_node(graph, "Mul", [codes, scale], gather.name, "scale"))
    _replace(graph, gather, nodes)


def _replace(graph: ir.Graph, old: ir.Node, nodes: list[ir.Node]) -> None:
    """Insert ``nodes`` before ``old``; the last one's output takes over ``old``'s output (name, type, shape, uses)."""
    out, new = old.outputs[0], nodes[-1].outputs[0]
    for n in nodes:
        graph.insert_before(old, n)
    new.type, new.shape = out.type, out.shape
    name = out.name
    out.replace_all_uses_with(new, replace_graph_outputs=True)
    operands = [v for v in old.inputs if v is not None]
    graph.remove(old, safe=True)
    new.name = name
    for value in operands:
        if value.is_initializer() and not any(True for _ in value.uses()) and not value.is_graph_output():
            graph.initializers.pop(value.name, None)


def _drop(graph: ir.Graph, dq: ir.Node) -> None:
    if any(True for _ in dq.outputs[0].uses()) or dq.outputs[0].is_graph_output():
        return
    operands = [v for v in dq.inputs if v is not None]
    graph.remove(dq, safe=True)
    for value in operands:
        if value.is_initializer() and not any(True for _ in value.uses()) and not value.is_graph_output():
            graph.initializers.pop(value.name, None)


def _node(graph: ir.Graph, op: str, inputs: list, base: str, hint: str, attrs: list | None = None) -> ir.Node:
    taken = {n.name for n in graph}
    name, i = f"{base}/{hint}", 0
    while name in taken:
        i += 1
        name = f"{base}/{hint}_{i}"
    node = ir.Node("", op, inputs, attrs or [], name=name, num_outputs=1)
    node.outputs[0].name = unique_name(graph, f"{name}_output")
    return node


