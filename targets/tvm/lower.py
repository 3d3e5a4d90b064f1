"""kiln IR -> a Relax IRModule, through TVM's ONNX frontend plus kiln's own lowerings.

Steps, on a copy of the IR (the caller's model is never edited):

1. ``quant.rewrite``: quantized weights become packed storage read by
   ``kiln.tvm::QMatMul`` / ``QGather`` / ``QDequantize``.
2. Weights become parameters: sizable float/8-bit initializers and the packed
   storage turn into trailing graph inputs, so ``main(inputs..., params...)``
   (the builder prepares them once and binds them into the library, or keeps
   them outside with ``params=external``). Small and integer initializers
   (shapes, axes, Resize scales) stay constants the frontend folds.
3. The frontend's importer, subclassed (`_Importer`) to convert kiln's ops with
   the TE kernels of ``quant_kernels`` and to keep every tensor's shape known:
   where Relax cannot prove two symbolic dims of a broadcast equal (a
   ``sequence`` against the length of a ``Range``) it would drop the whole
   shape, and later Shape/Gather chains and LegalizeOps then fail. kiln
   match-casts such operands to the dims of the first one (checked at run
   time), and gives any tensor that still has no shape fresh symbolic dims.
   ``Range(0, <a dim of a shape>, 1)`` becomes an arange of that symbolic dim
   (the frontend's data-dependent length ends up defined after its first use
   once FuseOps reorders kernels), and Clip with constant bounds maximum/minimum with constants
   (instead of scalar NaN guards constant folding would build one by one).

ConstantOfShape fills of a constant shape (the zoo's weight fills) become
initializers first: numpy fills them at once where TVM would fold each with a
compiled kernel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import warnings
from typing import Any

import numpy as np
import onnx_ir as ir

from compiler.errors import UnsupportedError
from targets.tvm import _env, quant

#: float/8-bit initializers at least this large become params (smaller ones stay constants)
MIN_PARAM_BYTES = 64
_LIFTABLE = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.INT8, ir.DataType.UINT8)
#: elementwise ONNX ops that broadcast their inputs (numpy rules)
_BROADCAST = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Where", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual",
    "And", "Or", "Xor", "Max", "Min", "Mod", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "PRelu", "Sum", "Mean",
})  # fmt: skip
KILN_OPS = ("QMatMul", "QGather", "QDequantize")
#: IRModule attribute: the number of packed-storage params right after main's inputs
PACKED_ATTR = "kiln.packed_params"


@dataclasses.dataclass
class Lowered:
    """The Relax module and how ``main`` is called."""

    mod: Any  # tvm.IRModule
    inputs: list[str]  # the model's input names, in main's order
    params: list[str]  # the lifted weights, after the inputs, in main's order (packed storage first)
    arrays: dict[str, np.ndarray]  # name -> value of every lifted weight
    quant: quant.QuantPlan


def lower(model: ir.Model, static_dims: dict[str, int] | None = None, *, int4_layout: str = "pairs") -> Lowered:
    """Lower ``model`` (not edited) to Relax; weights lifted as described in the module docstring.

    ``static_dims`` ({"batch": 1}) fixes symbolic input dims by name before import, so every kernel
    has static shapes (what MetaSchedule can tune). ``int4_layout``: how 4-bit weights are stored (``quant.rewrite``).
    """
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    graph = copy.graph
    if static_dims:
        _fix_dims(graph, static_dims)
    # inputs that are also initializers are overridable weights (old exporters list every weight): kiln
    # treats them as weights, so main's inputs are the data inputs (as in the artifact's signature)
    for value in [v for v in graph.inputs if v.name in graph.initializers]:
        graph.inputs.remove(value)
    _materialize_fills(graph)
    _fold_pads(copy)
    plan = quant.rewrite(copy, int4_layout=int4_layout)
    inputs = [v.name for v in graph.inputs]
    storage = set(plan.storage)
    arrays: dict[str, np.ndarray] = {}
    # packed storage first: the builder keeps it as is (read at run time by kiln's kernels)
    ordered = sorted(copy.graph.initializers.items(), key=lambda item: item[0] not in storage)
    for name, value in ordered:
        tensor = value.const_value
        lift = name in storage or (
            tensor is not None and tensor.dtype in _LIFTABLE and tensor.nbytes >= MIN_PARAM_BYTES
        )
        if not lift:
            continue
        arrays[name] = np.asarray(tensor.numpy())
        copy.graph.initializers.pop(name)
        value.const_value = None
        value.type = ir.TensorType(tensor.dtype)
        value.shape = ir.Shape(list(tensor.shape))
        copy.graph.inputs.append(value)
    proto = ir.serde.serialize_model(copy)
    mod = _import(proto)
    # how many leading params are packed storage (build.lift_param_transforms leaves them as they are)
    mod = mod.with_attr(PACKED_ATTR, len(plan.storage))
    return Lowered(mod, inputs, list(arrays), arrays, plan)


def _fold_pads(model: ir.Model) -> None:
    """Zero Pads folded into the Conv/pool that reads them (kiln's fuse-pad rule, at any -O level).

    Relax has no layout rule for pad: in an NHWC build each explicit Pad (TF-style "same" padding, as in
    EfficientNet-Lite) became a transpose to NCHW, the pad and a transpose back, 17 copies costing 10 % of
    EfficientNet-Lite0's time; folded, the convolution reads its padding in place."""
    from passes.fusion.pad import FusePad

    FusePad().run(model)


def _fix_dims(graph: ir.Graph, dims: dict[str, int]) -> None:
    found = set()
    for value in graph.inputs:
        if value.shape is None:
            continue
        new = []
        for d in value.shape:
            name = getattr(d, "value", None) if not isinstance(d, int) else None
            if isinstance(name, str) and name in dims:
                found.add(name)
                new.append(dims[name])
            else:
                new.append(d)
        value.shape = ir.Shape(new)
    unknown = sorted(set(dims) - found)
    if unknown:
        known = sorted({d.value for v in graph.inputs if v.shape is not None for d in v.shape
                        if not isinstance(d, int) and isinstance(getattr(d, "value", None), str)})
        raise UnsupportedError(f"static dims {', '.join(unknown)} are not symbolic dims of the model's inputs",
                               hint=f"its symbolic dims: {', '.join(known) or 'none'}")


def _materialize_fills(graph: ir.Graph) -> None:
    """ConstantOfShape of a constant shape -> an initializer (so it becomes a param like any weight).

    TVM would fold each such fill by building and running a kernel for it, one at a time (seconds per
    model for the zoo's ConstantOfShape-filled weights); numpy does it at once.
    """
    for node in list(graph):
        if node.op_type != "ConstantOfShape" or node.domain not in ("", "ai.onnx"):
            continue
        shape = node.inputs[0]
        if shape is None or shape.const_value is None or node.outputs[0].is_graph_output():
            continue
        attr = node.attributes.get("value")
        fill = attr.as_tensor().numpy().reshape(-1) if attr is not None else np.zeros(1, np.float32)
        dims = [int(d) for d in np.asarray(shape.const_value.numpy()).reshape(-1)]
        array = np.full(dims, fill[0], dtype=fill.dtype)
        out = node.outputs[0]
        name = out.name or f"{node.name}_value"
        value = ir.Value(name=name, shape=ir.Shape(dims), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         const_value=ir.tensor(array, name=name))
        out.replace_all_uses_with(value)
        graph.remove(node, safe=True)
        graph.register_initializer(value)


def _import(proto: Any) -> Any:
    _env.tvm()
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    importer = _importer_class()({}, {}, keep_params_in_input=False, sanitize=True)
    try:
        # the frontend warns about every renamed input and prints the op it failed on: kiln reports instead
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            return importer.from_onnx(proto.graph, opset)
    except UnsupportedError:
        raise
    except Exception as err:  # the frontend's errors name no node: say which one it was converting
        node = getattr(importer, "kiln_current", None)
        where = f"node {node[0]!r} ({node[1]})" if node else "the graph"
        first = str(err).strip().splitlines()[-1][:300] if str(err).strip() else type(err).__name__
        raise UnsupportedError(f"TVM's ONNX frontend cannot lower {where}: {first}") from None


_IMPORTER: Any = None


def _importer_class() -> type:
    """The frontend's ONNXGraphImporter with kiln's conversions (built once TVM is imported)."""
    global _IMPORTER
    if _IMPORTER is not None:
        return _IMPORTER
    from tvm import ir as tvm_ir
    from tvm import relax, tirx
    from tvm.relax.frontend.onnx import onnx_frontend

    from targets.tvm import quant_kernels

    fresh = itertools.count()

    def known_shape(expr: Any) -> list | None:
        ty = getattr(expr, "ty", None)
        if isinstance(expr, relax.Expr) and isinstance(ty, relax.TensorType) and isinstance(ty.shape, relax.ShapeExpr):
            return list(ty.shape.values)
        return None

    class _Importer(onnx_frontend.ONNXGraphImporter):
        kiln_current: tuple[str, str] | None = None

        def _check_for_unsupported_ops(self, graph: Any) -> None:
            from targets.tvm.legalize import frontend_ops

            known = frontend_ops()
            for node in graph.node:
                if node.op_type not in known and node.op_type not in KILN_OPS and node.op_type != "Constant":
                    raise UnsupportedError(f"node {node.name!r}: {node.op_type} has no TVM lowering")

        def _convert_operator(self, op_name: str, inputs: Any, attrs: dict, opset: int) -> Any:
            self.kiln_current = (attrs.get("tvm_custom", {}).get("name", ""), op_name)
            if op_name in KILN_OPS:
                return self._kiln_op(op_name, list(inputs), attrs)
            if op_name == "Range":
                ranged = self._range_by_prims(list(inputs))
                if ranged is not None:
                    return ranged
            if op_name == "Clip" and opset >= 11:
                clipped = self._clip_by_constants(list(inputs))
                if clipped is not None:
                    return clipped
            out = super()._convert_operator(op_name, inputs, attrs, opset)
            if op_name == "Gather":
                self._note_shape_element(list(inputs), out)
            if op_name in _BROADCAST and self._shapeless(out):
                unified = onnx_frontend.onnx_input()
                for value in self._unify(list(inputs)):
                    unified.append(value)
                out = super()._convert_operator(op_name, unified, attrs, opset)
            if self._shapeless(out) and out.ty.ndim >= 0:
                dims = [tirx.Var(f"kiln_d{next(fresh)}", "int64") for _ in range(out.ty.ndim)]
                out = self.bb.match_cast(out, relax.TensorType(dims, out.ty.dtype))
            return out

        @staticmethod
        def _shapeless(out: Any) -> bool:
            return (isinstance(out, relax.Expr) and not isinstance(out, relax.Tuple)
                    and isinstance(out.ty, relax.TensorType) and out.ty.shape is None)

        def _unify(self, inputs: list) -> list:
            """Match-cast broadcast operands so each symbolic dim position uses one variable."""
            shapes = [known_shape(x) if x is not None else None for x in inputs]
            rank = max((len(s) for s in shapes if s is not None), default=0)
            chosen = {}
            for pos in range(1, rank + 1):
                dims = [s[-pos] for s in shapes if s is not None and len(s) >= pos]
                consts = [d for d in dims if isinstance(d, tirx.IntImm) and d.value != 1]
                symbolic = [d for d in dims if not isinstance(d, tirx.IntImm)]
                if consts or symbolic:
                    chosen[pos] = (consts or symbolic)[0]
            out = list(inputs)
            for i, (value, shape) in enumerate(zip(inputs, shapes)):
                if shape is None:
                    continue
                new, changed = list(shape), False
                for pos in range(1, len(shape) + 1):
                    d = shape[-pos]
                    if not isinstance(d, tirx.IntImm) and pos in chosen and not d.same_as(chosen[pos]):
                        new[-pos], changed = chosen[pos], True
                if changed:
                    out[i] = self.bb.match_cast(value, relax.TensorType(new, value.ty.dtype))
            return out

        def _note_shape_element(self, inputs: list, out: Any) -> None:
            """Remember which symbolic dim a Gather of a shape picked (for `_range_by_prims`)."""
            data, index = inputs[0], inputs[1]
            if isinstance(data, relax.ShapeExpr) and isinstance(index, tvm_ir.GenericConst):
                idx = index.value.numpy()
                if idx.ndim == 0:
                    self.__dict__.setdefault("kiln_prims", []).append((out, data.values[int(idx)]))

        def _prim_of(self, value: Any) -> Any:
            if isinstance(value, tvm_ir.GenericConst) and value.value.numpy().size == 1:
                number = value.value.numpy().reshape(())
                return int(number) if number.dtype.kind in "iu" else None
            for known, prim in self.__dict__.get("kiln_prims", []):
                if known.same_as(value):
                    return prim
            return None

        def _range_by_prims(self, inputs: list) -> Any:
            """Range(0, Gather(Shape(x), i), 1) as an arange of the symbolic dim itself. The frontend
            computes the length as a tensor and match-casts it to a fresh variable, which FuseOps can
            then move below its first use (VMShapeLower fails: "has not been computed")."""
            prims = [self._prim_of(v) for v in inputs]
            if any(p is None for p in prims) or not isinstance(prims[0], int) or not isinstance(prims[2], int):
                return None
            dtype = str(inputs[0].ty.dtype)
            if dtype not in ("int64", "int32") or prims[2] == 0:
                return None
            return self.bb.normalize(relax.op.arange(prims[0], prims[1], prims[2], dtype=dtype))

        def _clip_by_constants(self, inputs: list) -> Any:
            """Clip with constant bounds as maximum/minimum with constants (the frontend's NaN-guard on
            each bound otherwise leaves scalar where/isnan ops that constant folding builds one by one)."""
            x = inputs[0]
            bounds = []
            for value, default in ((inputs[1] if len(inputs) > 1 else None, -np.inf),
                                   (inputs[2] if len(inputs) > 2 else None, np.inf)):
                if value is None:
                    bounds.append(default)
                elif isinstance(value, tvm_ir.GenericConst) and value.value.numpy().size == 1:
                    v = float(value.value.numpy().reshape(()))
                    bounds.append(default if np.isnan(v) else v)
                else:
                    return None
            if not isinstance(getattr(x, "ty", None), relax.TensorType) or not str(x.ty.dtype).startswith("float"):
                return None
            # maximum/minimum with scalar constants, not relax.clip: ConvertLayout has no layout rule for
            # clip, so NHWC convolutions got a transpose to NCHW and back around every ReLU6, which also
            # kept the clip out of the convolution's fused epilogue
            dtype = str(x.ty.dtype)
            if np.isfinite(bounds[0]):
                x = self.bb.normalize(relax.op.maximum(x, relax.const(bounds[0], dtype)))
            if np.isfinite(bounds[1]):
                x = self.bb.normalize(relax.op.minimum(x, relax.const(bounds[1], dtype)))
            return x

        def _kiln_op(self, op_name: str, inputs: list, attrs: dict) -> Any:
            bits, signed = int(attrs["bits"]), bool(attrs["signed"])
            if op_name == "QMatMul":
                x, *packed = inputs
                return self.bb.emit_te(quant_kernels.qmatmul, x, *packed, bits=bits, signed=signed,
                                       group=int(attrs["group"]), k=int(attrs["k"]), n=int(attrs["n"]),
                                       primfunc_name_hint="kiln_qmatmul")
            if op_name == "QGather":
                codes, indices, *rest = inputs
                return self.bb.emit_te(quant_kernels.qgather, codes, indices, *rest, bits=bits, signed=signed,
                                       group=int(attrs["group"]), rows=int(attrs["rows"]), cols=int(attrs["cols"]),
                                       dtype=(str(ir.DataType(int(attrs["dtype"])).numpy()) if "dtype" in attrs
                                              else str(rest[0].ty.dtype)),
                                       primfunc_name_hint="kiln_qgather")
            return self.bb.emit_te(quant_kernels.qdequantize, *inputs, bits=bits, signed=signed,
                                   axis=int(attrs["axis"]), block=int(attrs["block"]),
                                   shape=[int(d) for d in attrs["shape"]], dtype=str(inputs[1].ty.dtype),
                                   primfunc_name_hint="kiln_qdequantize")

    _IMPORTER = _Importer
    return _IMPORTER
