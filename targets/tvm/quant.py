"""kiln's quantized weights -> packed storage read by fused TVM kernels.

The quantize stage leaves every quantized weight in one canonical form:
``DequantizeLinear(q, scale[, zero])`` of an integer initializer (int4/uint4
blocked along the reduction axis, int8/uint8 per channel, or per tensor).
TVM's ONNX frontend would turn that into a constant DequantizeLinear that
constant folding expands back into a float32 weight. Instead, before the
frontend runs, this module rewrites the IR copy it is given:

- ``DequantizeLinear -> MatMul`` (weight as B, 2-D) and ``-> Gemm`` (B, any
  ``transB``) become ``kiln.tvm::QMatMul(x, codes, scale[, zero])``: 4-bit codes
  packed two per byte along K (element 2i in the low nibble, signed codes
  stored offset by 8), laid out [K/2, N] with N contiguous, scales and zero
  points [G, N] for G groups of ``group`` along K: the kernel's vector axis is
  N, so every load is contiguous. The kernel dequantizes inside the matmul's
  reduction (``quant_kernels.qmatmul``), so the weight never exists in float.
  Gemm's alpha and C become a Mul and an Add after it.
- ``DequantizeLinear -> Gather`` (embedding tables, axis 0) becomes
  ``kiln.tvm::QGather``: only the gathered rows are dequantized.
- Every other reader (Conv, a Transpose, ...) reads ``kiln.tvm::QDequantize``:
  the same packed storage, dequantized by a kernel at run time (never folded
  into a float constant).

``int4_layout="words"`` (MLC-LLM's ``q4f16_1`` / ``q4f32_1`` layout, what
``--emit mlc`` packages store) changes how symmetric 4-bit weights of
``QMatMul`` and ``QGather`` are stored when their codes lie in [-7, 7] and
their groups hold whole words: eight codes per uint32 word along K (code
``i`` of a word at bits ``4i``, stored ``+7``), laid out [N, K/8] with K
padded to whole groups, scales [N, G] (float16 when that is exact, as for
``q4f16_1``'s float16 scales; the kernels still compute in float32). The
kernels tell the layouts apart by the codes' dtype (uint32).

Storage tensors are recorded in ``QuantPlan.storage``: the builder keeps them
out of constant folding (they are bound into the library after it, or are
params when ``params=external``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from passes.quantize.rewrite import add_initializer

DOMAIN = "kiln.tvm"
_INT_TYPES = {
    ir.DataType.INT4: (4, True), ir.DataType.UINT4: (4, False),
    ir.DataType.INT8: (8, True), ir.DataType.UINT8: (8, False),
}  # fmt: skip
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


@dataclasses.dataclass
class QuantPlan:
    """What the rewrite did: node counts and the names of the packed storage initializers."""

    qmatmul: int = 0
    qgather: int = 0
    qdequantize: int = 0
    storage: list[str] = dataclasses.field(default_factory=list)
    packed_bytes: int = 0

    def to_json(self) -> dict:
        return {"QMatMul": self.qmatmul, "QGather": self.qgather, "QDequantize": self.qdequantize,
                "packed_bytes": self.packed_bytes}


@dataclasses.dataclass
class _Weight:
    """A DequantizeLinear of an integer initializer, as numpy."""

    node: ir.Node
    q: np.ndarray  # int codes, int16 (signed or unsigned values)
    scale: np.ndarray
    zero: np.ndarray | None
    axis: int  # -1 per tensor
    block: int  # 0: per channel along axis (or per tensor)
    bits: int
    signed: bool
    name: str


def lowered_dequantize_nodes(model: ir.Model) -> list[ir.Node]:
    """The DequantizeLinear nodes of quantized weights this backend lowers itself."""
    return [n for n in model.graph if _weight_of(n) is not None]


def _const(value: ir.Value | None) -> bool:
    return (value is not None and value.const_value is not None and value.is_initializer()
            and not value.is_graph_input())


def _weight_of(node: ir.Node) -> tuple[ir.Value, ir.Value, ir.Value | None] | None:
    if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return None
    ins = list(node.inputs) + [None] * (3 - len(node.inputs))
    q, scale, zero = ins[0], ins[1], ins[2]
    if not _const(q) or not _const(scale) or (zero is not None and not _const(zero)):
        return None
    if q.const_value.dtype not in _INT_TYPES or scale.const_value.dtype not in _FLOAT_TYPES:
        return None
    return q, scale, zero


def _read(node: ir.Node) -> _Weight:
    q, scale, zero = _weight_of(node)
    bits, signed = _INT_TYPES[q.const_value.dtype]
    codes = np.asarray(q.const_value.numpy()).astype(np.int16)
    s = np.asarray(scale.const_value.numpy())
    z = None if zero is None else np.asarray(zero.const_value.numpy()).astype(np.int16)
    block = node.attributes.get_int("block_size", 0)
    axis = node.attributes.get_int("axis", 1)
    if s.size == 1 and block == 0:
        axis = -1
    elif codes.ndim:
        axis %= codes.ndim
    return _Weight(node, codes, s, z, axis, block, bits, signed, q.name or node.name)


#: 4-bit codes per uint32 word and the offset they are stored with, in the ``words`` layout
PER_WORD = 8
WORD_OFFSET = 7
INT4_LAYOUTS = ("pairs", "words")


def rewrite(model: ir.Model, int4_layout: str = "pairs") -> QuantPlan:
    """Rewrite every quantized weight of the main graph in place (``model`` is the backend's copy).

    ``int4_layout``: ``pairs`` (two codes per byte, K-major) or ``words`` (MLC's; see the module docstring)."""
    if int4_layout not in INT4_LAYOUTS:
        raise ValueError(f"int4_layout {int4_layout!r}: expected one of {', '.join(INT4_LAYOUTS)}")
    words = int4_layout == "words"
    plan = QuantPlan()
    graph = model.graph
    storage: dict[tuple[str, str], list[ir.Value]] = {}
    for dq in lowered_dequantize_nodes(model):
        w = _read(dq)
        out = dq.outputs[0]
        rest = []
        for use in list(out.uses()):
            node, index = use.node, use.idx
            if (_rewrite_matmul(graph, w, node, index, storage, plan, words)
                    or _rewrite_gather(graph, w, node, index, storage, plan, words)):
                continue
            rest.append(use)
        if rest or out.is_graph_output():
            _rewrite_dequantize(graph, w, storage, plan)
        else:
            _remove(graph, dq)
    return plan


# ------------------------------------------------------------------ matmul


def _matmul_layout(w: _Weight, trans_b: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int] | None:
    """(codes [N, K], scale [N, G], zero [N, G], group) for a weight read as B [K, N] (or [N, K] when trans_b)."""
    if w.q.ndim != 2:
        return None
    k_axis = 1 if trans_b else 0
    codes = w.q if trans_b else w.q.T
    n, k = codes.shape
    if w.axis == -1:  # per tensor
        return codes, np.full((n, 1), w.scale.reshape(()), w.scale.dtype), _full_zero(w, (n, 1)), k
    if w.block == 0:
        if w.axis == k_axis:
            return None  # one scale per input channel: not a matmul weight layout
        return codes, w.scale.reshape(n, 1), None if w.zero is None else w.zero.reshape(n, 1), k
    if w.axis != k_axis:
        return None  # blocked along the output axis: dequantized on its own
    scale = w.scale if trans_b else w.scale.T
    zero = None if w.zero is None else (w.zero if trans_b else w.zero.T)
    return codes, scale, zero, w.block


def _full_zero(w: _Weight, shape: tuple[int, ...]) -> np.ndarray | None:
    return None if w.zero is None else np.full(shape, w.zero.reshape(()), np.int16)


def _rewrite_matmul(graph, w: _Weight, node: ir.Node, index: int, storage, plan: QuantPlan,
                    words: bool = False) -> bool:
    if node.domain not in ("", "ai.onnx") or index != 1:
        return False
    if node.op_type == "MatMul":
        trans_b, alpha, bias, beta = False, 1.0, None, 1.0
    elif node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            return False
        trans_b = bool(node.attributes.get_int("transB", 0))
        alpha = node.attributes.get_float("alpha", 1.0)
        beta = node.attributes.get_float("beta", 1.0)
        bias = node.inputs[2] if len(node.inputs) > 2 else None
    else:
        return False
    layout = _matmul_layout(w, trans_b)
    if layout is None:
        return False
    codes, scale, zero, group = layout
    if words and _fits_words(w, codes, zero, group):
        packed = _word_storage(graph, w, "nk" if trans_b else "kn", codes, scale, group, storage, plan)
    else:
        packed = _storage(graph, w, "kn", codes, scale, zero, storage, plan, k_major=True)
    n, k = codes.shape
    attrs = [ir.AttrInt64("bits", w.bits), ir.AttrInt64("signed", int(w.signed)), ir.AttrInt64("group", group),
             ir.AttrInt64("k", k), ir.AttrInt64("n", n)]
    qmm = ir.Node(DOMAIN, "QMatMul", [node.inputs[0], *packed], attrs, name=f"{node.name}_q", num_outputs=1)
    new_nodes = [qmm]
    result = qmm.outputs[0]
    result.dtype = node.outputs[0].dtype
    if alpha != 1.0:
        a = _scalar(graph, f"{node.name}_alpha", alpha, scale.dtype)
        mul = ir.Node("", "Mul", [result, a], name=f"{node.name}_alpha_mul", num_outputs=1)
        new_nodes.append(mul)
        result = mul.outputs[0]
    if bias is not None:
        if beta != 1.0:
            b = _scalar(graph, f"{node.name}_beta", beta, scale.dtype)
            mul = ir.Node("", "Mul", [bias, b], name=f"{node.name}_beta_mul", num_outputs=1)
            new_nodes.append(mul)
            bias = mul.outputs[0]
        add = ir.Node("", "Add", [result, bias], name=f"{node.name}_bias", num_outputs=1)
        new_nodes.append(add)
        result = add.outputs[0]
    _swap(graph, node, new_nodes, result)
    plan.qmatmul += 1
    return True


# ------------------------------------------------------------------ gather


def _rewrite_gather(graph, w: _Weight, node: ir.Node, index: int, storage, plan: QuantPlan,
                    words: bool = False) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type != "Gather" or index != 0 or w.q.ndim != 2:
        return False
    if node.attributes.get_int("axis", 0) % 2 != 0:
        return False
    v, d = w.q.shape
    if w.axis == -1:
        scale, zero, group = np.full((v, 1), w.scale.reshape(()), w.scale.dtype), _full_zero(w, (v, 1)), d
    elif w.block == 0 and w.axis == 0:
        scale, zero, group = w.scale.reshape(v, 1), None if w.zero is None else w.zero.reshape(v, 1), d
    elif w.block > 0 and w.axis == 1:
        scale, zero, group = w.scale, w.zero, w.block
    else:
        return False
    attrs = [ir.AttrInt64("bits", w.bits), ir.AttrInt64("signed", int(w.signed)), ir.AttrInt64("group", group),
             ir.AttrInt64("rows", v), ir.AttrInt64("cols", d)]
    if words and _fits_words(w, w.q, zero, group):
        packed = _word_storage(graph, w, "nk", w.q, scale, group, storage, plan)
        # the rows' dtype (float16 word scales are storage only)
        attrs.append(ir.AttrInt64("dtype", node.outputs[0].dtype.value))
    else:
        packed = _storage(graph, w, "nk", w.q, scale, zero, storage, plan)
    qg = ir.Node(DOMAIN, "QGather", [packed[0], node.inputs[1], *packed[1:]], attrs, name=f"{node.name}_q",
                 num_outputs=1)
    qg.outputs[0].dtype = node.outputs[0].dtype
    _swap(graph, node, [qg], qg.outputs[0])
    plan.qgather += 1
    return True


# -------------------------------------------------------------- dequantize


def _rewrite_dequantize(graph, w: _Weight, storage, plan: QuantPlan) -> None:
    """The DequantizeLinear itself becomes QDequantize of flat packed codes (same output value)."""
    flat = w.q.reshape(1, -1)
    scale = w.scale.reshape(1) if w.axis == -1 else w.scale
    zero = None if w.zero is None else (w.zero.reshape(1) if w.axis == -1 else w.zero)
    packed = _storage(graph, w, "flat", flat, scale, zero, storage, plan, keep_shapes=True)
    attrs = [ir.AttrInt64("bits", w.bits), ir.AttrInt64("signed", int(w.signed)), ir.AttrInt64("axis", w.axis),
             ir.AttrInt64("block", w.block), ir.AttrInt64s("shape", list(w.q.shape))]
    node = ir.Node(DOMAIN, "QDequantize", packed, attrs, name=f"{w.node.name}_q", num_outputs=1)
    node.outputs[0].dtype = w.node.outputs[0].dtype
    operands = [v for v in w.node.inputs if v is not None]
    _swap(graph, w.node, [node], node.outputs[0])
    _drop_unused(graph, operands)
    plan.qdequantize += 1


# ----------------------------------------------------------------- storage


def pack_codes(codes: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """Integer codes [R, C] -> storage: 4 bits as uint8 [R, ceil(C/2)] (low nibble first, signed +8); 8 bits as is."""
    if bits == 8:
        return codes.astype(np.int8 if signed else np.uint8)
    u = (codes.astype(np.int16) + (8 if signed else 0)).astype(np.uint8)
    if u.shape[-1] % 2:
        u = np.concatenate([u, np.zeros(u.shape[:-1] + (1,), np.uint8)], axis=-1)
    return np.ascontiguousarray(u[..., 0::2] | (u[..., 1::2] << 4))


def unpack_codes(packed: np.ndarray, bits: int, signed: bool, cols: int) -> np.ndarray:
    """The inverse of `pack_codes` (for tests and the numpy reference)."""
    if bits == 8:
        return packed.astype(np.int16)
    lo, hi = packed & 15, packed >> 4
    u = np.stack([lo, hi], axis=-1).reshape(packed.shape[:-1] + (-1,))[..., :cols].astype(np.int16)
    return u - 8 if signed else u


def pack_words(codes: np.ndarray) -> np.ndarray:
    """Signed 4-bit codes [R, C] (in [-7, 8]) -> uint32 words [R, ceil(C/8)]: code ``i`` of a word at bits
    ``4i``, stored ``+7``; a partial last word is filled with zero codes."""
    u = (np.asarray(codes).astype(np.int32) + WORD_OFFSET).astype(np.uint32)
    pad = -u.shape[-1] % PER_WORD
    if pad:
        u = np.concatenate([u, np.full(u.shape[:-1] + (pad,), WORD_OFFSET, np.uint32)], axis=-1)
    u = u.reshape(u.shape[:-1] + (-1, PER_WORD))
    shifts = np.arange(PER_WORD, dtype=np.uint32) * 4
    return np.ascontiguousarray(np.bitwise_or.reduce(u << shifts, axis=-1).astype(np.uint32))


def unpack_words(words: np.ndarray, cols: int) -> np.ndarray:
    """The inverse of `pack_words`: int16 codes [R, cols]."""
    shifts = np.arange(PER_WORD, dtype=np.uint32) * 4
    u = (np.asarray(words)[..., None] >> shifts) & 15
    return u.reshape(u.shape[:-2] + (-1,))[..., :cols].astype(np.int16) - WORD_OFFSET


def _fits_words(w: _Weight, codes: np.ndarray, zero, group: int) -> bool:
    """Symmetric int4 whose codes the words layout holds, in groups of whole words."""
    return (w.bits == 4 and w.signed and zero is None and group % PER_WORD == 0
            and (codes.size == 0 or int(codes.min()) >= -WORD_OFFSET))


def _word_storage(graph, w: _Weight, orientation: str, codes: np.ndarray, scale: np.ndarray, group: int,
                  storage, plan: QuantPlan) -> list[ir.Value]:
    """uint32 words [R, G*group/8] (C padded to whole groups with zero codes) and scales [R, G];
    ``orientation``: ``nk`` when ``codes`` is the weight as stored, ``kn`` when it is its transpose."""
    key = (w.name, f"words-{orientation}")
    if key in storage:
        return storage[key]
    rows, cols = codes.shape
    padded = np.zeros((rows, scale.shape[1] * group), np.int16)
    padded[:, :cols] = codes
    half = scale.astype(np.float16)
    if scale.dtype != np.float16 and np.array_equal(half.astype(scale.dtype), scale):
        scale = half  # exactly float16 values (MLC's q4f16_1): stored in 16 bits
    base = w.name.removesuffix("_quantized")
    values = [add_initializer(graph, f"{base}.q4w", pack_words(padded)),
              add_initializer(graph, f"{base}.scale", np.ascontiguousarray(scale))]
    for v in values:
        plan.storage.append(v.name)
        plan.packed_bytes += v.const_value.nbytes
    storage[key] = values
    return values


def _storage(graph, w: _Weight, layout: str, codes, scale, zero, storage, plan: QuantPlan,
             keep_shapes: bool = False, k_major: bool = False) -> list[ir.Value]:
    """Packed codes [R, C] (pairs of 4-bit codes along C), scale and zero [R, G]; ``k_major`` stores
    the transposes instead ([C/2, R], [G, R]): a matmul kernel then reads along N, its vector axis."""
    key = (w.name, layout)
    if key in storage:
        return storage[key]
    base = w.name.removesuffix("_quantized")
    packed = pack_codes(codes, w.bits, w.signed)
    zero = None if zero is None else zero.astype(np.int8 if w.signed else np.uint8)
    if k_major:
        packed, scale = packed.T, scale.T
        zero = None if zero is None else zero.T
        base = f"{base}.kn"
    values = [add_initializer(graph, f"{base}.q{w.bits}", np.ascontiguousarray(packed))]
    values.append(add_initializer(graph, f"{base}.scale", np.ascontiguousarray(scale)))
    if zero is not None:
        values.append(add_initializer(graph, f"{base}.zero", np.ascontiguousarray(zero)))
    for v in values:
        plan.storage.append(v.name)
        plan.packed_bytes += v.const_value.nbytes
    storage[key] = values
    return values


def _scalar(graph: ir.Graph, hint: str, value: float, dtype) -> ir.Value:
    return add_initializer(graph, hint, np.asarray(value, dtype=dtype))


def _swap(graph: ir.Graph, old: ir.Node, new_nodes: list[ir.Node], result: ir.Value) -> None:
    ir.convenience.replace_nodes_and_values(graph, old, [old], new_nodes, [old.outputs[0]], [result])


def _remove(graph: ir.Graph, dq: ir.Node) -> None:
    operands = [v for v in dq.inputs if v is not None]
    graph.remove(dq, safe=True)
    _drop_unused(graph, operands)


def _drop_unused(graph: ir.Graph, operands: list[ir.Value]) -> None:
    for value in operands:
        if value.is_initializer() and not any(True for _ in value.uses()) and not value.is_graph_output():
            graph.initializers.pop(value.name, None)
