"""Keep a graph output's declared size when the channels it carries are pruned (the hidden size).

An encoder such as MiniLM returns its last hidden state: pruning the hidden
size would change the model's interface. The output is put back to its size
by ``Pad`` (append the pruned count) and a constant-index ``Gather`` (each
original position reads its kept channel or a padded slot); the pruned
positions then hold the final LayerNorm's bias (what it outputs for a channel
whose scale is zero), or zeros when no LayerNorm writes the output. Consumers
see the same shape; the pruned positions carry no information.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from passes.prune.groups import OutputTouch
from passes.prune.params import Rewriter, find_param


def fill_values(touch: OutputTouch, size: int) -> np.ndarray:
    """What the pruned positions hold, read before the weights are sliced."""
    norm = touch.norm
    if norm is not None and len(norm.inputs) > 2 and norm.inputs[2] is not None:
        bias = find_param(norm.inputs[2])
        if bias is not None and bias.shape == (size,):
            return np.asarray(bias.array(), dtype=np.float32).copy()
    return np.zeros(size, dtype=np.float32)


def restore_output(model: ir.Model, rw: Rewriter, touch: OutputTouch, keep: np.ndarray, size: int,
                   fill: np.ndarray) -> None:
    """Make the graph output ``touch.value`` (now ``len(keep)`` wide on ``touch.axis``) ``size`` wide again."""
    graph = model.graph
    y = touch.value
    shape = list(y.shape) if y.shape is not None else None
    rank = len(shape) if shape is not None else None
    if rank is None:
        raise AssertionError(f"graph output {y.name!r} has no known rank")
    axis = touch.axis
    name = y.name
    y.name = rw.fresh(name)
    pruned = np.setdiff1d(np.arange(size), keep)
    index = np.empty(size, dtype=np.int64)
    index[keep] = np.arange(len(keep))
    index[pruned] = len(keep) + np.arange(len(pruned))

    def const(label: str, data: np.ndarray) -> ir.Value:
        value = ir.Value(name=rw.fresh(f"{name}_{label}"), shape=ir.Shape(data.shape),
                         type=ir.TensorType(ir.DataType.from_numpy(data.dtype)))
        value.const_value = ir.tensor(data, name=value.name)
        graph.register_initializer(value)
        return value

    pads = np.zeros(2 * rank, dtype=np.int64)
    pads[rank + axis] = len(pruned)
    full = list(shape)
    full[axis] = size
    padded_shape = list(shape)
    padded_shape[axis] = size
    opset = model.opset_imports.get("", 1)
    if opset >= 11:
        pad = ir.Node("", "Pad", [y, const("pads", pads)], name=rw.fresh(f"{name}_pad"))
    else:
        pad = ir.Node("", "Pad", [y], attributes=[ir.AttrInt64s("pads", pads.tolist())], name=rw.fresh(f"{name}_pad"))
    pad.outputs[0].name = rw.fresh(f"{name}_padded")
    pad.outputs[0].shape = ir.Shape(padded_shape)
    pad.outputs[0].type = y.type
    gather = ir.Node("", "Gather", [pad.outputs[0], const("positions", index)],
                     attributes=[ir.AttrInt64("axis", axis)], name=rw.fresh(f"{name}_restore"))
    out = gather.outputs[0]
    nodes = [pad, gather]
    if np.any(fill[pruned] != 0):
        values = np.zeros(size, dtype=np.float32)
        values[pruned] = fill[pruned]
        values = values.reshape([size] + [1] * (rank - 1 - axis))
        out.name = rw.fresh(f"{name}_gathered")
        out.shape, out.type = ir.Shape(full), y.type
        add = ir.Node("", "Add", [out, const("fill", values)], name=rw.fresh(f"{name}_fill"))
        nodes.append(add)
        out = add.outputs[0]
    out.name = name
    out.shape, out.type = ir.Shape(full), y.type
    graph.extend(nodes)
    position = list(graph.outputs).index(y)
    graph.outputs[position] = out
