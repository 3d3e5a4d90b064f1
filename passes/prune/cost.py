"""What a model costs: parameters, bytes and multiply-accumulates of its weighted layers.

MACs count the weighted layers (Conv, ConvTranspose, Gemm, MatMul with a
constant weight) for one sample: every symbolic dim (batch, sequence) is
taken as 1, so a transformer's figure is per token. The positions each layer
computes (output pixels, rows) are measured once on the inferred shapes and
do not change with pruning; MACs = positions x weight elements.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from passes.prune.params import find_param, is_float

WEIGHTED = frozenset({"Conv", "FusedConv", "ConvTranspose", "Gemm", "MatMul"})


def _static(dims) -> int:
    total = 1
    for d in dims:
        total *= d if isinstance(d, int) and d > 0 else 1
    return total


def layer_positions(model: ir.Model, probed: dict[str, tuple[int, ...]] | None = None) -> dict[str, int]:
    """Node name -> positions (output pixels / rows) for each weighted layer (shapes inferred beforehand;
    ``probed`` shapes fill in the spatial dims of convolutions onnx cannot infer, such as contrib FusedConv)."""
    probed = probed or {}
    out: dict[str, int] = {}
    for node in model.graph:
        if node.op_type not in WEIGHTED or len(node.inputs) < 2 or find_param(node.inputs[1]) is None:
            continue
        if node.op_type == "MatMul" and node.inputs[0].const_value is not None:
            continue
        if node.op_type == "ConvTranspose":
            shape = node.inputs[0].shape
            out[node.name] = _static(list(shape)[2:]) if shape is not None else 1
        elif node.op_type in ("Conv", "FusedConv"):
            shape = node.outputs[0].shape
            spatial = list(shape)[2:] if shape is not None else None
            if spatial is None or not all(isinstance(d, int) for d in spatial):
                seen = probed.get(node.outputs[0].name or "")
                spatial = list(seen[2:]) if seen is not None else (spatial or [])
            out[node.name] = _static(spatial)
        else:
            shape = node.outputs[0].shape
            out[node.name] = _static(list(shape)[:-1]) if shape is not None else 1
    return out


def layer_macs(model: ir.Model, positions: dict[str, int]) -> dict[str, int]:
    nodes = {n.name: n for n in model.graph}
    macs = {}
    for name, count in positions.items():
        node = nodes.get(name)
        param = find_param(node.inputs[1]) if node is not None else None
        macs[name] = 0 if param is None else int(count) * param.numel
    return macs


def weight_sizes(model: ir.Model) -> dict[tuple[str, int], tuple[int, int]]:
    """(node name, input index) -> (elements, bytes) of every float weight a node reads."""
    out = {}
    for node in model.graph:
        for i, value in enumerate(node.inputs):
            param = find_param(value)
            if param is not None and param.numel > 1 and is_float(param):
                out[(node.name, i)] = (param.numel, param.nbytes)
    return out


def total_macs(macs: dict[str, int]) -> int:
    return int(np.sum(list(macs.values()), dtype=np.int64)) if macs else 0
