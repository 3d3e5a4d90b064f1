"""Re-encode kiln's canonical int4 weights for onnxruntime's contrib kernels.

The quantize stage leaves int4 weights in standard ONNX: ``DequantizeLinear``
of an int4/uint4 initializer blocked along the reduction axis, read by a
MatMul (or Gemm) or, for embedding tables, by a Gather. When the target's
runtime has onnxruntime's contrib ops and its device lists the
``matmulnbits`` encoding, this module rewrites

- ``DequantizeLinear(q [K, N], axis 0) -> MatMul(x, .)`` (and Gemm with
  ``transB``, whose weight is already [N, K] with blocks along axis 1) into
  ``com.microsoft.MatMulNBits``: codes as unsigned nibbles packed two per byte,
  low nibble first, shape [N, K/B, B/2]; scales [N, K/B]; zero points packed the
  same way, [N, ceil((K/B)/2)], only for affine (uint4) weights; symmetric int4
  codes are stored offset by 8, which is MatMulNBits' default zero point;
- ``DequantizeLinear(q [V, D], axis 1) -> Gather(axis 0)`` into
  ``com.microsoft.GatherBlockQuantized``, which reads the int4 table as it is
  and dequantizes only the gathered rows (the QDQ form dequantizes the whole
  table on every run: onnxruntime does not fuse that pair itself).

onnxruntime 1.32 already fuses DequantizeLinear -> MatMul into MatMulNBits when
it creates a session (at ``accuracy_level`` 4 unless the session says
otherwise); encoding it in the artifact makes the file independent of that
transformer and of the session options, and fixes the accuracy level. Values
keep their names, so the encoded graph computes the same tensors.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from compiler.ir.quant import get_quant, set_quant

CONTRIB = "com.microsoft"
#: MatMulNBits' accuracy_level: 0 keeps the activations in float32, so the kernel computes
#: exactly what the canonical DequantizeLinear -> MatMul means (to float rounding). 4 quantizes
#: each block of the activations to int8 on the fly (what onnxruntime's own DQ->MatMul fusion
#: picks): about 4x faster for one token at a time on x86 here, but measured 1.6-3.7% relative
#: L2 away from the canonical form on decoders with outlier channels, past the driver's 2%
#: verification bound; it is the ``int4_accuracy_level=4`` emit option.
DEFAULT_ACCURACY_LEVEL = 0


@dataclasses.dataclass
class EncodeReport:
    matmulnbits: int = 0
    gather_block_quantized: int = 0
    kept: list[str] = dataclasses.field(default_factory=list)  # DequantizeLinear nodes left as they were, and why
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"MatMulNBits": self.matmulnbits, "GatherBlockQuantized": self.gather_block_quantized}
        if self.matmulnbits:
            out["accuracy_level"] = self.accuracy_level
        if self.kept:
            out["kept_qdq"] = self.kept
        return out


def wants_int4_contrib(spec: Any) -> bool:
    """Whether artifacts for ``spec`` should carry MatMulNBits / GatherBlockQuantized."""
    return bool(getattr(spec, "onnx_runtime_contrib", False)) and "matmulnbits" in tuple(
        getattr(spec, "quant_encodings", ()) or ()
    )


def encode_int4(model: ir.Model, *, accuracy_level: int = DEFAULT_ACCURACY_LEVEL, gather: bool = True) -> EncodeReport:
    """Rewrite every eligible int4 DequantizeLinear in the main graph, in place."""
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level must be 0..4, got {accuracy_level}")
    report = EncodeReport(accuracy_level=accuracy_level)
    graph = model.graph
    for dq in [n for n in graph if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx")]:
        weight = _blocked_int4(dq)
        if weight is None:
            continue
        users = list(dq.outputs[0].uses())
        if not users or dq.outputs[0].is_graph_output():
            continue
        kinds = {_consumer_kind(u.node, u.idx, weight) for u in users}
        if kinds == {"matmul"}:
            packed = _pack_for_matmul(graph, dq, weight)
            for use in users:
                _replace_with_matmulnbits(graph, use.node, packed, accuracy_level)
                report.matmulnbits += 1
        elif kinds == {"gather"} and gather:
            for use in users:
                _replace_with_gather_block_quantized(graph, use.node, dq, weight)
                report.gather_block_quantized += 1
        else:
            why = next(k for k in kinds if k not in ("matmul", "gather")) if kinds - {"matmul", "gather"} else "mixed"
            report.kept.append(f"{dq.name}: {why}")
            continue
        _drop_if_unused(graph, dq)
    if report.matmulnbits or report.gather_block_quantized:
        model.opset_imports.setdefault(CONTRIB, 1)
    return report


@dataclasses.dataclass
class _Int4Weight:
    q: ir.Value
    scale: ir.Value
    zero: ir.Value | None
    axis: int
    block_size: int


def _blocked_int4(dq: ir.Node) -> _Int4Weight | None:
    """The DequantizeLinear's operands when it is a 2-D int4/uint4 weight blocked along one axis."""
    ins = list(dq.inputs) + [None] * (3 - len(dq.inputs))
    q, scale, zero = ins[0], ins[1], ins[2]
    if q is None or scale is None or not _is_initializer(q) or not _is_initializer(scale):
        return None
    if q.const_value.dtype not in (ir.DataType.INT4, ir.DataType.UINT4) or len(q.const_value.shape) != 2:
        return None
    if scale.const_value.dtype != ir.DataType.FLOAT:
        return None
    if zero is not None and (not _is_initializer(zero) or zero.const_value.dtype != q.const_value.dtype):
        return None
    block = dq.attributes.get_int("block_size", 0)
    axis = dq.attributes.get_int("axis", 1) % 2
    if block < 16 or block & (block - 1):
        return None
    if q.const_value.dtype == ir.DataType.UINT4 and zero is None:
        return None  # uint4 with an implicit zero point of 0: no MatMulNBits default matches
    return _Int4Weight(q, scale, zero, axis, block)


def _is_initializer(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.is_initializer() and not value.is_graph_input()


def _consumer_kind(node: ir.Node, index: int, weight: _Int4Weight) -> str:
    """"matmul" / "gather" when ``node`` can read this weight through a contrib kernel, else why not."""
    if node.domain not in ("", "ai.onnx"):
        return f"read by {node.domain}::{node.op_type}"
    if node.op_type == "MatMul" and index == 1:
        return "matmul" if weight.axis == 0 else "MatMul weight blocked along its output axis"
    if node.op_type == "Gemm" and index == 1:
        if node.attributes.get_int("transA", 0) or node.attributes.get_float("alpha", 1.0) != 1.0:
            return "Gemm with transA or alpha"
        if weight.axis != (1 if node.attributes.get_int("transB", 0) else 0):
            return "Gemm weight blocked along its output axis"
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = node.inputs[2]
            n = weight.q.const_value.shape[0 if weight.axis == 1 else 1]
            if node.attributes.get_float("beta", 1.0) != 1.0 or c.shape is None or list(c.shape) != [n]:
                return "Gemm bias is not a [N] vector"
        return "matmul"
    if node.op_type == "Gather" and index == 0:
        if node.attributes.get_int("axis", 0) == 0 and weight.axis == 1:
            return "gather"
        return "Gather along a blocked axis"
    return f"read by {node.op_type}"


@dataclasses.dataclass
class _Packed:
    blob: ir.Value
    scales: ir.Value
    zeros: ir.Value | None
    k: int
    n: int
    block_size: int


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Unsigned 4-bit values (uint8 holding 0..15), last axis even, -> bytes: element 2i in the low nibble."""
    codes = codes.astype(np.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def matmulnbits_arrays(
    q_nk: np.ndarray, scale_nk: np.ndarray, zero_nk: np.ndarray | None, block_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """MatMulNBits (B, scales, zero_points) from codes/scale/zero laid out [N, K] / [N, K/B].

    ``q_nk`` holds signed codes (-8..7) when ``zero_nk`` is None, else unsigned codes (0..15).
    """
    n, k = q_nk.shape
    blocks = -(-k // block_size)
    if zero_nk is None:
        unsigned = (q_nk.astype(np.int16) + 8).astype(np.uint8)  # MatMulNBits' default zero point is 8
        pad_value = 8
    else:
        unsigned = q_nk.astype(np.uint8)
        pad_value = 0
    padded = np.full((n, blocks * block_size), pad_value, dtype=np.uint8)
    padded[:, :k] = unsigned
    blob = pack_nibbles(padded.reshape(n, blocks, block_size))
    scales = np.ascontiguousarray(scale_nk, dtype=np.float32).reshape(n, blocks)
    zeros = None
    if zero_nk is not None:
        z = np.zeros((n, blocks + (blocks & 1)), dtype=np.uint8)
        z[:, :blocks] = zero_nk.astype(np.uint8)
        zeros = pack_nibbles(z)
    return blob, scales, zeros


def _pack_for_matmul(graph: ir.Graph, dq: ir.Node, w: _Int4Weight) -> _Packed:
    q = w.q.const_value.numpy()
    scale = w.scale.const_value.numpy()
    zero = None if w.zero is None else w.zero.const_value.numpy()
    if w.axis == 0:  # MatMul layout [K, N]: transpose to [N, K]
        q, scale = q.T, scale.T
        zero = None if zero is None else zero.T
    n, k = q.shape
    blob, scales, zeros = matmulnbits_arrays(
        np.asarray(q, dtype=np.int16 if w.zero is None else np.uint8), scale,
        None if zero is None else np.asarray(zero, dtype=np.uint8), w.block_size,
    )
    base = w.q.name.removesuffix("_quantized") if w.q.name else dq.name
    blob_v = _initializer(graph, f"{base}_nbits", blob)
    record = get_quant(w.q)
    if record is not None:
        set_quant(blob_v, dataclasses.replace(record, axis=1, packing="nibble-lo-first"))
    scales_v = _initializer(graph, f"{base}_nbits_scales", scales)
    zeros_v = None if zeros is None else _initializer(graph, f"{base}_nbits_zeros", zeros)
    return _Packed(blob_v, scales_v, zeros_v, k, n, w.block_size)


def _replace_with_matmulnbits(graph: ir.Graph, node: ir.Node, packed: _Packed, accuracy_level: int) -> None:
    inputs: list[ir.Value | None] = [node.inputs[0], packed.blob, packed.scales, packed.zeros]
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        inputs += [None, node.inputs[2]]  # g_idx unused, then bias
    while inputs and inputs[-1] is None:
        inputs.pop()
    attrs = [
        ir.AttrInt64("K", packed.k),
        ir.AttrInt64("N", packed.n),
        ir.AttrInt64("bits", 4),
        ir.AttrInt64("block_size", packed.block_size),
        ir.AttrInt64("accuracy_level", accuracy_level),
    ]
    new = ir.Node(CONTRIB, "MatMulNBits", inputs, attrs, name=node.name, num_outputs=1)
    _swap(graph, node, new)


def _replace_with_gather_block_quantized(graph: ir.Graph, node: ir.Node, dq: ir.Node, w: _Int4Weight) -> None:
    inputs = [w.q, node.inputs[1], w.scale] + ([w.zero] if w.zero is not None else [])
    attrs = [
        ir.AttrInt64("gather_axis", 0),
        ir.AttrInt64("quantize_axis", 1),
        ir.AttrInt64("block_size", w.block_size),
        ir.AttrInt64("bits", 4),
    ]
    new = ir.Node(CONTRIB, "GatherBlockQuantized", inputs, attrs, name=node.name, num_outputs=1)
    _swap(graph, node, new)


def _swap(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    """Put ``new`` where ``old`` was; its output takes over the old output's name, type, shape and uses."""
    ir.convenience.replace_nodes_and_values(graph, old, [old], [new], [old.outputs[0]], [new.outputs[0]])


def _drop_if_unused(graph: ir.Graph, dq: ir.Node) -> None:
    if any(True for _ in dq.outputs[0].uses()) or dq.outputs[0].is_graph_output():
        return
    operands = [v for v in dq.inputs if v is not None]
    graph.remove(dq, safe=True)
    for value in operands:
        if value.is_initializer() and not any(True for _ in value.uses()) and not value.is_graph_output():
            graph.initializers.pop(value.name, None)


def _initializer(graph: ir.Graph, hint: str, array: np.ndarray) -> ir.Value:
    name, i = hint, 0
    while name in graph.initializers:
        i += 1
        name = f"{hint}_{i}"
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value
