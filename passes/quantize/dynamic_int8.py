"""Dynamic int8 (``int8-dynamic``): int8 weights per output channel, activations quantized at run time.

Each MatMul (rank-2 constant B) and Gemm (constant B) with float32 operands becomes::

    x ── DynamicQuantizeLinear ──> xq (uint8), x_scale, x_zero
    MatMulInteger(xq, wq, x_zero) ── Cast(float) ── Mul(·, x_scale * w_scale) [── Add(bias)] ──> y

standard ONNX (opset >= 11) that onnxruntime's CPU provider fuses into its
dynamic-quantization kernels (``com.microsoft.DynamicQuantizeMatMul``, or
``MatMulIntegerToFloat`` behind a shared DynamicQuantizeLinear): u8s8 integer
GEMM on prepacked weights with the rescale and bias in the same kernel.
``wq`` is int8, symmetric per output channel, so MatMulInteger needs no weight
zero point. ``y`` keeps the quantized node's output name; the MatMulInteger
takes the quantized node's name.

One DynamicQuantizeLinear serves every rewritten MatMul that reads the same
activation (the Q/K/V projections).

Embedding tables (Gather of a constant, rank 2) are stored as int8 per row,
weight-only (``DequantizeLinear -> Gather``, as ``w8`` does; option
``embeddings=false`` keeps them float): a Gather does no arithmetic to speed
up, the gain is size.

Conv stays float: onnxruntime has no fused dynamic ConvInteger kernel, and
DynamicQuantizeLinear -> ConvInteger -> Cast -> Mul measured 1.6-3.5x slower
than float Conv on 1x1 convolutions of EfficientNet-Lite0's shapes with int8
weights (0.9-1.6x with uint8 weights), onnxruntime 1.32, one thread.

x86 CPUs without VNNI (AVX2): MLAS multiplies u8 by s8 with VPMADDUBSW, whose
int16 sum of two adjacent products saturates when both are large. uint8
weights (u8u8, exact) avoid it but measured 30% slower on all-MiniLM-L6-v2 for
the same embedding cosine, so the weights stay int8; VNNI and ARM are exact.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from compiler.ir.quant import QuantRecord, set_quant
from passes.quantize import numerics
from passes.quantize.core import LayerRecord, QuantContext, ensure_node_names
from passes.quantize.rewrite import add_initializer, unique_name, unique_node_name
from passes.quantize.weight_only import MIN_ELEMENTS, find_weights, quantize_use, round_to_nearest

#: DynamicQuantizeLinear and MatMulInteger exist from opset 10 / 11.
MIN_OPSET = 11


@dataclasses.dataclass
class _Candidate:
    node: ir.Node
    activation: ir.Value
    weight: ir.Value
    #: the weight as [K, N] float32 (Gemm's transB and alpha applied)
    matrix: np.ndarray
    #: Gemm's C scaled by beta (a constant), or None
    bias: np.ndarray | None
    #: Gemm's non-constant C (added after the rescale), or None
    bias_value: ir.Value | None


def apply(scheme, model: ir.Model, ctx: QuantContext) -> list[LayerRecord]:
    """Rewrite every eligible MatMul/Gemm in place; returns one record per MatMul/Gemm/Conv with a constant weight."""
    ensure_node_names(model.graph)
    graph = model.graph
    records: list[LayerRecord] = []
    #: (weight name, Gemm transB/alpha) -> (int8 codes, per-channel scale), shared by every user of the weight
    weights: dict[tuple, tuple[ir.Value, ir.Value]] = {}
    #: activation value -> DynamicQuantizeLinear outputs (xq, x_scale, x_zero)
    activations: dict[ir.Value, tuple[ir.Value, ir.Value, ir.Value]] = {}
    opset_ok = _opset(model) >= MIN_OPSET
    nodes = [n for n in graph if n.domain in ("", "ai.onnx") and n.op_type in ("MatMul", "Gemm", "Conv")]
    with ctx.progress("quantizing matmuls", len(nodes)) as bar:
        for node in nodes:
            bar.update(1, node.name)
            record = _record_for(node)
            if record is None:
                continue
            records.append(record)
            if node.name in ctx.exclude:
                record.note = "kept in float (accuracy budget)"
                continue
            if node.op_type == "Conv":
                record.note = "Conv stays float under int8-dynamic (onnxruntime's ConvInteger is slower than float Conv)"
                continue
            if not opset_ok:
                record.note = f"kept in float: the model's opset {_opset(model)} has no MatMulInteger (needs {MIN_OPSET})"
                continue
            cand, why = _candidate(node)
            if cand is None:
                record.note = f"kept in float: {why}"
                continue
            _rewrite(graph, cand, scheme, weights, activations, record)
    if getattr(scheme, "embeddings", True):
        records.extend(_quantize_embeddings(model, scheme, ctx))
    return records


@dataclasses.dataclass(frozen=True)
class _TableInt8:
    """What ``weight_only.quantize_use`` reads of a scheme: int8, symmetric, per channel (one scale per row)."""

    name: str
    label: str
    bits: int = 8
    block_size: int = 0
    symmetric: bool = True

    def spec(self) -> str:
        return self.label


def _quantize_embeddings(model: ir.Model, scheme, ctx: QuantContext) -> list[LayerRecord]:
    table = _TableInt8(scheme.name, scheme.spec())
    records = []
    for use in find_weights(model, kinds=("gather",)):
        if any(u.node.op_type != "Gather" for u in use.value.uses()):
            continue  # a table also read by a float MatMul stays float for that reader too
        record = quantize_use(model, use, table, ctx, round_to_nearest)
        if record.scheme != "float32":
            record.note = "embedding table: int8 weight-only (DequantizeLinear -> Gather)"
        records.append(record)
    return records


def _opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))


def _is_const(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.is_initializer() and not value.is_graph_input()


def _record_for(node: ir.Node) -> LayerRecord | None:
    """A float32 record for a MatMul/Gemm/Conv whose weight is a large enough constant, else None."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if not _is_const(weight):
        return None
    tensor = weight.const_value
    if node.op_type == "MatMul" and len(tensor.shape) != 2:
        return None
    if tensor.size < MIN_ELEMENTS:
        return None
    return LayerRecord(node=node.name, op=node.op_type, scheme="float32", output=node.outputs[0].name,
                       weight=weight.name, bytes_before=tensor.nbytes, bytes_after=tensor.nbytes)


def _candidate(node: ir.Node) -> tuple[_Candidate | None, str]:
    x, weight = node.inputs[0], node.inputs[1]
    # MatMul/Gemm take A and B of one type, so a float32 weight means a float32 activation
    if x is None or weight.const_value.dtype != ir.DataType.FLOAT:
        return None, "not float32 (DynamicQuantizeLinear reads float32 activations)"
    w = weight.const_value.numpy().astype(np.float32)
    if node.op_type == "MatMul":
        if x.shape is not None and len(x.shape) < 2:
            return None, "1-D activation"
        return _Candidate(node, x, weight, w, None, None), ""
    # Gemm: y = alpha * A' @ B' + beta * C
    attrs = node.attributes
    if attrs.get_int("transA", 0):
        return None, "Gemm with transA=1"
    alpha, beta = attrs.get_float("alpha", 1.0), attrs.get_float("beta", 1.0)
    matrix = (w.T if attrs.get_int("transB", 0) else w) * np.float32(alpha)
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if c is None or beta == 0.0:
        return _Candidate(node, x, weight, matrix, None, None), ""
    if _is_const(c):
        return _Candidate(node, x, weight, matrix, c.const_value.numpy().astype(np.float32) * np.float32(beta), None), ""
    if beta != 1.0:
        return None, "Gemm with a non-constant C scaled by beta"
    return _Candidate(node, x, weight, matrix, None, c), ""


def _rewrite(graph: ir.Graph, cand: _Candidate, scheme, weights: dict, activations: dict, record: LayerRecord) -> None:
    node = cand.node
    name = node.name
    gemm = node.op_type == "Gemm"
    key = (cand.weight.name, node.attributes.get_float("alpha", 1.0) if gemm else 1.0,
           node.attributes.get_int("transB", 0) if gemm else 0)
    base = cand.weight.name
    if key not in weights:
        q, scale, _ = numerics.quantize_weight(cand.matrix, bits=8, axis=1, block_size=0, symmetric=True)
        qv = add_initializer(graph, f"{base}_quantized", q)
        set_quant(qv, QuantRecord(scheme=scheme.name, bits=8, block_size=0, axis=1, symmetric=True))
        sv = add_initializer(graph, f"{base}_scale", scale.astype(np.float32))
        weights[key] = (qv, sv)
        record.bytes_after = q.nbytes + scale.nbytes
    else:  # the weight's bytes were counted by its first user
        record.bytes_after = 0
    qv, sv = weights[key]

    def make(op: str, inputs: list, hint: str, outputs: int = 1, attrs=(), prefix: str = name) -> ir.Node:
        n = ir.Node("", op, inputs, list(attrs), name=unique_node_name(graph, f"{prefix}/{hint}"), num_outputs=outputs)
        for i, out in enumerate(n.outputs):
            out.name = unique_name(graph, f"{prefix}/{hint}_output_{i}")
        graph.insert_before(node, n)
        return n

    if cand.activation not in activations:
        prefix = cand.activation.name or name
        xq, xs, xz = make("DynamicQuantizeLinear", [cand.activation], "dynamic_quantize", outputs=3, prefix=prefix).outputs
        xq.type, xs.type, xz.type = (ir.TensorType(ir.DataType.UINT8), ir.TensorType(ir.DataType.FLOAT),
                                     ir.TensorType(ir.DataType.UINT8))
        xq.shape, xs.shape, xz.shape = cand.activation.shape, ir.Shape([]), ir.Shape([])
        activations[cand.activation] = (xq, xs, xz)
    xq, xs, xz = activations[cand.activation]
    old = node.outputs[0]
    mmi = make("MatMulInteger", [xq, qv, xz], "matmul_integer").outputs[0]
    cast = make("Cast", [mmi], "cast", attrs=[ir.AttrInt64("to", ir.DataType.FLOAT.value)]).outputs[0]
    scale = make("Mul", [xs, sv], "scale").outputs[0]
    y = make("Mul", [cast, scale], "rescale").outputs[0]
    if cand.bias is not None:
        bias = add_initializer(graph, f"{name}_bias", cand.bias)
        y = make("Add", [y, bias], "bias").outputs[0]
    elif cand.bias_value is not None:
        y = make("Add", [y, cand.bias_value], "bias").outputs[0]
    mmi.type = ir.TensorType(ir.DataType.INT32)
    for v in (cast, scale, y):
        v.type = ir.TensorType(ir.DataType.FLOAT)
    scale.shape = sv.shape
    for v in (mmi, cast, y):
        v.shape = old.shape
    out_name = old.name
    old.replace_all_uses_with(y, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    y.name = out_name
    mmi.producer().name = name  # the integer matmul takes the quantized node's name
    if cand.weight.name in graph.initializers and not any(True for _ in cand.weight.uses()):
        graph.initializers.pop(cand.weight.name)
    record.scheme = scheme.spec()
