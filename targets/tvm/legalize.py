"""What TVM cannot lower: every offending node, named, in one list."""

from __future__ import annotations

import functools
from typing import Any

import onnx_ir as ir

from targets.tvm import _env

_STANDARD_DOMAINS = ("", "ai.onnx")
#: control flow: TVM's Relax frontend has no Loop/Scan, and its If needs static shapes in both branches
_CONTROL_FLOW = ("If", "Loop", "Scan")
#: element types the Relax VM cannot take or return
_BAD_DTYPES = {
    ir.DataType.STRING: "string", ir.DataType.COMPLEX64: "complex64", ir.DataType.COMPLEX128: "complex128",
}  # fmt: skip


@functools.cache
def frontend_ops() -> frozenset[str]:
    """The op types TVM's ONNX frontend converts (its converter table)."""
    _env.tvm()
    from tvm.relax.frontend.onnx import onnx_frontend

    return frozenset(onnx_frontend._get_convert_map())


def legalize(model: ir.Model, spec: Any) -> list[str]:
    """Every node and graph value ``--emit tvm`` cannot lower for ``spec``."""
    from targets.tvm.quant import lowered_dequantize_nodes

    problems: list[str] = []
    if spec.device != "cpu" and spec.device not in ("cuda", "opencl", "metal", "webgpu"):
        problems.append(f"device {spec.device!r}: this TVM build has no code generator for it")
    known = frontend_ops()
    kiln_lowered = {id(n) for n in lowered_dequantize_nodes(model)}
    for node in model.graph:
        problem = _node_problem(node, known, id(node) in kiln_lowered)
        if problem:
            label = f"node {node.name!r}" if node.name else "an unnamed node"
            problems.append(f"{label}: {problem}")
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        dtype = value.dtype
        if dtype in _BAD_DTYPES:
            problems.append(f"graph value {value.name!r}: {_BAD_DTYPES[dtype]} tensors cannot cross the TVM VM boundary")
        elif value.type is not None and not isinstance(value.type, ir.TensorType):
            problems.append(f"graph value {value.name!r}: {value.type} is not a tensor (TVM takes tensors only)")
    return problems


def _node_problem(node: ir.Node, known: frozenset[str], kiln_lowered: bool) -> str | None:
    domain = "" if node.domain == "ai.onnx" else node.domain
    if domain not in _STANDARD_DOMAINS:
        return f"{domain}::{node.op_type} is not a standard ONNX op (TVM lowers the ai.onnx domain only)"
    if node.op_type in _CONTROL_FLOW:
        return f"{node.op_type} (control flow) has no TVM lowering"
    if node.op_type not in known:
        return f"{node.op_type} has no TVM lowering"
    if node.op_type == "DequantizeLinear" and not kiln_lowered and node.attributes.get_int("block_size", 0):
        return "a blocked DequantizeLinear of a computed tensor has no TVM lowering (only of weights)"
    return None
