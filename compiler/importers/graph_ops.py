"""A small builder for the ONNX graphs made from LLM checkpoints (``graph_llama``, ``graph_gpt2``, ``graph_bert``).

Weights become initializers backed by ``ir.LazyTensor``: the checkpoint tensor is
read (and re-laid out) only when something asks for its bytes — a pass, the
quantizer, the emitter — and is never cached, so building the graph costs no
weight memory. Written with external data (the ONNX backend does so above
1 GB), a conversion holds about one tensor at a time; below that the emitter
serializes one protobuf, about twice the float32 model.

The layers are written in the decomposed standard-op forms kiln's fusions
recognize (RMSNorm as Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul, attention as
MatMul/Mul/Add/Softmax/MatMul with an additive mask), so -O2/-O3 fuse them
into RMSNormalization / Attention / onnxruntime contrib ops where the target
allows, while --emit tvm reads plain ops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from compiler.errors import ModelFormatError
from compiler.importers.checkpoint import Checkpoint

#: the default opset: blocked int4 DequantizeLinear (--quantize w4) needs 21, and TVM's ONNX frontend
#: lowers everything built here at 21 (it has no RMSNormalization / Attention, which -O2 fuses to at 23)
OPSET = 21
#: the additive mask value for a disallowed key: finite, so a fully masked row gives a uniform softmax, not NaN
MASKED = float(np.finfo(np.float32).min)


class GraphBuilder:
    def __init__(self, ck: Checkpoint, opset: int = OPSET) -> None:
        self.ck = ck
        self.opset = opset
        self.nodes: list[ir.Node] = []
        self.inputs: list[ir.Value] = []
        self.initializers: list[ir.Value] = []
        self._names: set[str] = set()  # value names
        self._node_names: set[str] = set()

    # ---------------------------------------------------------------- values
    def _unique(self, name: str, taken: set[str] | None = None) -> str:
        taken = self._names if taken is None else taken
        base, i = name, 1
        while name in taken:
            name = f"{base}_{i}"
            i += 1
        taken.add(name)
        return name

    def input(self, name: str, dtype: ir.DataType, dims: Sequence[int | str]) -> ir.Value:
        value = ir.Value(name=self._unique(name), type=ir.TensorType(dtype), shape=ir.Shape(list(dims)))
        self.inputs.append(value)
        return value

    def const(self, array: Any, name: str, dtype: Any = np.float32) -> ir.Value:
        """A small constant initializer (shapes, scales, eps)."""
        data = np.asarray(array, dtype=dtype)
        value = ir.Value(name=self._unique(name), const_value=ir.tensor(data, name=name))
        value.const_value.name = value.name
        value.type, value.shape = ir.TensorType(value.const_value.dtype), ir.Shape(data.shape)
        self.initializers.append(value)
        return value

    def ints(self, values: Sequence[int], name: str) -> ir.Value:
        return self.const(list(values), name, np.int64)

    def weight(self, tensor_name: str, name: str, layout: Callable[[np.ndarray], np.ndarray] | None = None,
               shape: Sequence[int] | None = None) -> ir.Value:
        """A float32 initializer read lazily from the checkpoint tensor ``tensor_name``;
        ``layout`` re-lays it out (its result has ``shape``, by default the stored shape)."""
        src = self.ck.tensor(tensor_name)
        if src is None:
            raise ModelFormatError(f"{self.ck.path}: tensor {tensor_name} is missing (truncated checkpoint?)")
        dims = tuple(shape) if shape is not None else src.shape
        value_name = self._unique(name)

        def load(src=src, layout=layout, dims=dims) -> ir.TensorProtocol:
            data = src.load()
            if layout is not None:
                data = layout(data)
            data = np.ascontiguousarray(data, dtype=np.float32)
            if data.shape != dims:
                raise ModelFormatError(f"tensor {tensor_name}: {list(data.shape)} after layout, expected {list(dims)}")
            return ir.tensor(data, name=value_name)

        lazy = ir.LazyTensor(load, dtype=ir.DataType.FLOAT, shape=ir.Shape(dims), name=value_name)
        value = ir.Value(name=value_name, const_value=lazy, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(dims))
        self.initializers.append(value)
        return value

    def linear_weight(self, tensor_name: str, name: str,
                      layout: Callable[[np.ndarray], np.ndarray] | None = None) -> ir.Value:
        """A checkpoint matrix stored (out, in) as the MatMul right operand (in, out)."""
        src = self.ck.tensor(tensor_name)
        rows, cols = src.shape if src is not None and len(src.shape) == 2 else (0, 0)  # weight() names a missing one

        def transposed(w: np.ndarray) -> np.ndarray:
            return (layout(w) if layout is not None else w).T

        return self.weight(tensor_name, name, transposed, (cols, rows))

    def has(self, tensor_name: str) -> bool:
        return self.ck.tensor(tensor_name) is not None

    def rename(self, value: ir.Value, name: str) -> ir.Value:
        """Give a node output its public name (a graph output's)."""
        self._names.discard(value.name)
        value.name = self._unique(name)
        return value

    # ---------------------------------------------------------------- nodes
    def op(self, op_type: str, *inputs: ir.Value | None, name: str, outputs: int = 1,
           **attributes: Any) -> Any:
        node_name = self._unique(name, self._node_names)
        node = ir.Node("", op_type, list(inputs), ir.convenience.convert_attributes(attributes),
                       num_outputs=outputs, name=node_name)
        for i, out in enumerate(node.outputs):
            out.name = self._unique(node_name if outputs == 1 else f"{node_name}.{i}")
        self.nodes.append(node)
        return node.outputs[0] if outputs == 1 else tuple(node.outputs)

    # ------------------------------------------------------------- layers
    def linear(self, x: ir.Value, prefix: str, name: str, layout=None, bias_layout=None) -> ir.Value:
        """x @ W(prefix.weight)^T [+ prefix.bias]."""
        w = self.linear_weight(f"{prefix}.weight", f"{name}.weight", layout)
        y = self.op("MatMul", x, w, name=f"{name}.matmul")
        if self.has(f"{prefix}.bias"):
            b = self.weight(f"{prefix}.bias", f"{name}.bias", bias_layout)
            y = self.op("Add", y, b, name=f"{name}.add")
        return y

    def rms_norm(self, x: ir.Value, weight: str, eps: float, name: str) -> ir.Value:
        sq = self.op("Pow", x, self.const(2.0, f"{name}.two"), name=f"{name}.pow")
        mean = self.op("ReduceMean", sq, self.ints([-1], f"{name}.axes"), name=f"{name}.mean", keepdims=1)
        var = self.op("Add", mean, self.const(eps, f"{name}.eps"), name=f"{name}.add_eps")
        inv = self.op("Reciprocal", self.op("Sqrt", var, name=f"{name}.sqrt"), name=f"{name}.rsqrt")
        y = self.op("Mul", x, inv, name=f"{name}.normalize")
        return self.op("Mul", y, self.weight(weight, f"{name}.weight"), name=f"{name}.scale")

    def layer_norm(self, x: ir.Value, prefix: str, eps: float, name: str) -> ir.Value:
        return self.op("LayerNormalization", x, self.weight(f"{prefix}.weight", f"{name}.weight"),
                       self.weight(f"{prefix}.bias", f"{name}.bias"), name=name, axis=-1, epsilon=float(eps))

    def split_heads(self, x: ir.Value, heads: int, head_dim: int, name: str) -> ir.Value:
        """(B, S, heads*head_dim) -> (B, heads, S, head_dim)."""
        r = self.op("Reshape", x, self.ints([0, 0, heads, head_dim], f"{name}.shape"), name=f"{name}.reshape")
        return self.op("Transpose", r, name=f"{name}.transpose", perm=[0, 2, 1, 3])

    def merge_heads(self, x: ir.Value, width: int, name: str) -> ir.Value:
        t = self.op("Transpose", x, name=f"{name}.transpose", perm=[0, 2, 1, 3])
        return self.op("Reshape", t, self.ints([0, 0, width], f"{name}.shape"), name=f"{name}.reshape")

    def attention(self, q: ir.Value, k: ir.Value, v: ir.Value, mask: ir.Value | None, head_dim: int,
                  name: str) -> ir.Value:
        """softmax(q k^T / sqrt(d) + mask) v on (B, N, S, H) tensors."""
        kt = self.op("Transpose", k, name=f"{name}.k_t", perm=[0, 1, 3, 2])
        scores = self.op("MatMul", q, kt, name=f"{name}.qk")
        scores = self.op("Mul", scores, self.const(1.0 / np.sqrt(head_dim), f"{name}.scale"), name=f"{name}.scaled")
        if mask is not None:
            scores = self.op("Add", scores, mask, name=f"{name}.masked")
        probs = self.op("Softmax", scores, name=f"{name}.softmax", axis=-1)
        return self.op("MatMul", probs, v, name=f"{name}.pv")

    def repeat_kv(self, x: ir.Value, n_rep: int, heads: int, head_dim: int, name: str) -> ir.Value:
        """(B, n_kv, S, H) -> (B, n_kv*n_rep, S, H), each kv head repeated n_rep times (GQA)."""
        if n_rep == 1:
            return x
        u = self.op("Unsqueeze", x, self.ints([2], f"{name}.axis"), name=f"{name}.unsqueeze")
        # both targets from x's own dims, as exporters write them: TVM's ONNX frontend expands dynamically
        # shaped data only to a shape it can read, and the pruning analysis follows the heads through them
        target = self.op("Concat", self.op("Shape", u, name=f"{name}.outer", start=0, end=2),
                         self.ints([n_rep], f"{name}.n_rep"), self.op("Shape", u, name=f"{name}.inner", start=3),
                         name=f"{name}.target", axis=0)
        e = self.op("Expand", u, target, name=f"{name}.expand")
        shape = self.op("Concat", self.op("Shape", x, name=f"{name}.batch", start=0, end=1),
                        self.ints([heads], f"{name}.heads"), self.op("Shape", x, name=f"{name}.seq_dim", start=2),
                        name=f"{name}.shape", axis=0)
        return self.op("Reshape", e, shape, name=f"{name}.reshape")

    def positions(self, input_ids: ir.Value) -> tuple[ir.Value, ir.Value]:
        """(sequence length as a 0-d int64, positions 0..S-1 as int64 (S,))."""
        shape = self.op("Shape", input_ids, name="seq.shape")
        seq = self.op("Gather", shape, self.const(1, "seq.axis", np.int64), name="seq.len", axis=0)
        pos = self.op("Range", self.const(0, "seq.zero", np.int64), seq, self.const(1, "seq.one", np.int64),
                      name="seq.positions")
        return seq, pos

    def additive_mask(self, pos: ir.Value, attention_mask: ir.Value | None, causal: bool,
                      window: int | None = None, name: str = "mask") -> ir.Value | None:
        """(B|1, 1, S, S) float: 0 where query i may read key j, MASKED elsewhere. Causal: j <= i
        (and i - j < window with a sliding window); attention_mask (B, S) drops padded keys."""
        allowed = None
        if causal:
            rows = self.op("Unsqueeze", pos, self.ints([1], f"{name}.rows_axis"), name=f"{name}.rows")
            cols = self.op("Unsqueeze", pos, self.ints([0], f"{name}.cols_axis"), name=f"{name}.cols")
            allowed = self.op("LessOrEqual", cols, rows, name=f"{name}.causal")
            if window is not None:
                dist = self.op("Sub", rows, cols, name=f"{name}.distance")
                near = self.op("Less", dist, self.const(window, f"{name}.window", np.int64), name=f"{name}.near")
                allowed = self.op("And", allowed, near, name=f"{name}.sliding")
        if attention_mask is not None:
            keys = self.op("Cast", attention_mask, name=f"{name}.keys", to=ir.DataType.BOOL)
            keys = self.op("Unsqueeze", keys, self.ints([1, 2], f"{name}.keys_axes"), name=f"{name}.keys_4d")
            allowed = keys if allowed is None else self.op("And", allowed, keys, name=f"{name}.padding")
        elif allowed is not None:
            allowed = self.op("Unsqueeze", allowed, self.ints([0, 1], f"{name}.axes"), name=f"{name}.causal_4d")
        if allowed is None:
            return None
        return self.op("Where", allowed, self.const(0.0, f"{name}.open"), self.const(MASKED, f"{name}.closed"),
                       name=name)

    # ---------------------------------------------------------------- model
    def model(self, outputs: Sequence[ir.Value], output_dims: Sequence[Sequence[int | str]]) -> ir.Model:
        for value, dims in zip(outputs, output_dims):
            value.type, value.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(list(dims))
        graph = ir.Graph(self.inputs, list(outputs), nodes=self.nodes, initializers=self.initializers,
                         opset_imports={"": self.opset}, name=f"kiln_{self.ck.arch}")
        return ir.Model(graph, ir_version=10, producer_name="kiln")
