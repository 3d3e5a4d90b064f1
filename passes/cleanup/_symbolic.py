"""onnxruntime's symbolic shape inference as a best-effort source of value shapes.

onnx's own inference leaves a dim unknown where it would have to do algebra:
``Reshape(x[b, s, 32], [b, s, -1, 16])`` is ``[b, s, ?, 16]`` to onnx, and
the GQA head-repeat and rotate_half shape math behind it stays dynamic.
onnxruntime's ``SymbolicShapeInference`` carries dims as sympy expressions
and gets ``[b, s, 2, 16]``.

It is run without ``auto_merge`` (merging two unknown broadcast dims assumes
neither is 1, which is not sound) and through its stepwise methods rather
than ``infer_shapes``, because that entry point writes a file into the
working directory when it stops early. What it inferred up to the first node
it cannot handle is kept; symbolic dims are kept only when they are exactly a
graph input's dim name (two dims with that name are then the same size), any
other expression becomes an unknown dim.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import re

import onnx

logger = logging.getLogger(__name__)

#: A model with more nodes than this is left to onnx's inference (sympy is slow).
MAX_NODES = 20000

_CACHE_SIZE = 4
_CACHE: collections.OrderedDict[bytes, dict[str, onnx.TypeProto]] = collections.OrderedDict()


def symbolic_value_infos(proto: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Tensor types (name -> TypeProto) of the main graph's values, as far as inferred.

    The passes of one fixpoint round ask again and again about an unchanged
    model: the last few answers are kept, keyed by the serialized model.
    """
    if len(proto.graph.node) > MAX_NODES:
        return {}
    key = hashlib.sha256(proto.SerializeToString(deterministic=True)).digest()
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    out = _infer(proto)
    _CACHE[key] = out
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return out


def _infer(proto: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    inference = None
    quiet = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        inference = _inference_class()(2**31 - 1, False, False, 0)
        inference._preprocess(_stubs_as_inputs(proto))
        rounds = 0
        while inference.run_ and rounds < 16:
            inference._infer_impl()
            rounds += 1
    except Exception as err:  # noqa: BLE001 - best effort: keep what was inferred before it stopped
        logger.info("symbolic shape inference stopped: %s", err)
    finally:
        quiet.setLevel(level)
    known = getattr(inference, "known_vi_", None) or {}
    input_dims = {
        d.dim_param
        for value in proto.graph.input
        for d in value.type.tensor_type.shape.dim
        if d.HasField("dim_param") and d.dim_param
    }
    produced = {name for node in proto.graph.node for name in node.output if name}
    out: dict[str, onnx.TypeProto] = {}
    for name, info in known.items():
        if name not in produced or not info.type.HasField("tensor_type"):
            continue
        tensor = info.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        type_proto = onnx.TypeProto()
        type_proto.CopyFrom(info.type)
        for dim in type_proto.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param not in input_dims:
                dim.Clear()
            elif dim.HasField("dim_value") and dim.dim_value < 0:
                dim.Clear()
        out[name] = type_proto
    return out


def _stubs_as_inputs(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose external-data initializers (the caller's stubs of big weights)
    are graph inputs of the same type: their shapes matter here, never their data."""
    stubs = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if not stubs:
        return proto
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    kept = [t for t in copy.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(kept)
    copy.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in stubs)
    return copy


_CLASS = None
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Where", "Sum", "Max", "Min", "Equal",
                          "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor"})
_MIN = re.compile(r"^Min\(([A-Za-z_][A-Za-z0-9_]*|[0-9]+),([A-Za-z_][A-Za-z0-9_]*|[0-9]+)\)$")


def _inference_class():
    """SymbolicShapeInference with one sound broadcast merge added (built once, lazily)."""
    global _CLASS
    if _CLASS is None:
        from onnxruntime.tools import symbolic_shape_infer as ssi

        class _Inference(ssi.SymbolicShapeInference):
            def _broadcast_shapes(self, shape1, shape2):
                return super()._broadcast_shapes(*_clamped_to_symbol(shape1, shape2))

            def _onnx_infer_single_node(self, node):
                # onnx's broadcast leaves Min(K, s) vs s unknown: redo it with the rule above
                super()._onnx_infer_single_node(node)
                if node.op_type not in _ELEMENTWISE or node.domain not in ("", "ai.onnx"):
                    return
                vi = self.known_vi_.get(node.output[0])
                shape = ssi.get_shape_from_value_info(vi) if vi is not None else None
                if shape is None or not self._is_shape_contains_none_dim(shape) and None not in shape:
                    return
                inputs = [self._get_shape(node, i) for i, name in enumerate(node.input) if name]
                if not inputs or any(s is None for s in inputs):
                    return
                merged = inputs[0]
                for other in inputs[1:]:
                    merged = self._broadcast_shapes(merged, other)
                if len(merged) == len(shape) and not any(d is None for d in merged):
                    vi.CopyFrom(ssi.helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type, merged))

        _CLASS = _Inference
    return _CLASS


def _clamped_to_symbol(shape1: list, shape2: list) -> tuple[list, list]:
    """Broadcast ``Min(K, s)`` against ``s`` (K >= 2) as ``s`` against ``s``.

    BERT's ``position_ids[:, :seq]`` has length Min(512, seq) and is added to a
    [batch, seq, hidden] tensor. Min(K, s) is 1 exactly when s is 1, so two
    such dims broadcast only when they are equal: on every run that succeeds
    the output dim is s. (onnxruntime's own auto_merge would also merge dims
    that may be 1, which is not sound.)
    """
    a, b = list(shape1), list(shape2)
    for i in range(1, min(len(a), len(b)) + 1):
        x, y = a[-i], b[-i]
        if isinstance(x, str) and isinstance(y, str) and x != y:
            if _is_clamp_of(x, y):
                a[-i] = y
            elif _is_clamp_of(y, x):
                b[-i] = x
    return a, b


def _is_clamp_of(expr: str, symbol: str) -> bool:
    """Whether ``expr`` is sympy's printing of Min(K, symbol) with an integer K >= 2."""
    match = _MIN.match(expr.replace(" ", ""))
    if match is None:
        return False
    first, second = match.groups()
    if first.isdigit():
        first, second = second, first
    return second.isdigit() and int(second) >= 2 and first == symbol
