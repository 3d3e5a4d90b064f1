"""float16 / bfloat16 (``fp16``, ``bf16``) with float32 islands.

Two forms, chosen from the target spec (``ctx.spec.dtypes``, the device's
native types):

* **compute** (the device lists the type, e.g. ``cuda``, ``metal``, the Apple
  CPUs for float16): weights and activations are float16/bfloat16; the nodes
  that must not be (the *islands*, below) stay float32 with a Cast at each
  boundary. Graph inputs and outputs keep their float32 types.
* **storage only** (the device lacks the type, e.g. every x86 CPU): each weight
  (float initializer of at least ``MIN_ELEMENTS``) is stored in the low type
  with a ``Cast`` to float32 in front of its consumers; compute stays float32.
  The file halves and nothing runs slower: onnxruntime folds the Cast once at
  session start. Measured on this x86 host (onnxruntime 1.32, 1 thread,
  interleaved medians): storage-only runs within +-5% of float32 on
  EfficientNet-Lite0, MiniLM and the tiny llama; the compute form runs
  7-22% slower on EfficientNet-Lite0 and the llama (about even on MiniLM):
  the CPU provider has no float16 MatMul, Conv, Add, Mul, Softmax, ... kernels
  and wraps each in Casts it inserts (fusing runs of them, so such a run is
  computed in float32 between two Casts). bfloat16 compute does not load on
  the CPU provider at all (no kernels; only Cast and data movement).

Islands (compute form). A node stays float32 when

* it is excluded (``ctx.exclude``), or its op/opset has no low-precision form
  in the ONNX schema (Range, custom ops, nodes with subgraphs);
* a value it produces or reads exceeds ``overflow_margin`` x the format's
  largest finite value: measured on ``ctx.calibration`` when given; always for
  constants and weights (attention masks of float32's minimum become -inf);
  without calibration, values downstream of Pow/Exp (squares and exponentials
  are how in-range activations leave the range: a decomposed norm's x**2)
  until an op that undoes them (Sqrt, Log, bounded activations);
* it is precision-sensitive: Softmax/LogSoftmax and the computation of their
  input (back through elementwise ops to the weightless MatMul, Q @ K^T,
  which runs in float32 as fused attention kernels do: rounding logits of
  std 8 to float16 moves the probabilities by 1.3e-2 relative, rounding the
  probabilities by 4.7e-4); Cos/Sin and their argument (rotary angles:
  float16 rounding of position x inv_freq costs 0.04 absolute in cos below
  position 256 and 0.96 below 4096); Pow and Exp; summing reductions
  (ReduceSum/Mean/L2/..., CumSum, GlobalAveragePool) over more than
  ``2**p / 16`` elements or an unknown count (a low-precision running sum
  stalls after ``2**p`` equal terms, 2048 for float16 where p = 11, 256 for
  bfloat16 where p = 8); InstanceNormalization; and LayerNormalization
  unless ``stash_type`` keeps its statistics float32.

Which of the remaining nodes run in the low type is a minimum cut: MatMul,
Gemm, Conv, ConvTranspose, Einsum and every reader of a weight are low, the
islands are float32, and each other node takes the side that needs the fewest
Cast elements (a float32 neighbourhood between islands merges into one
island instead of casting down and back up). Ties go to the low type.

Names: every node keeps its output value names (a converted node's output
changes dtype, not name). A graph output produced in the low type is renamed
``<name>_<dtype>`` and a Cast to float32 produces the original name. Weights
read by both low and float32 nodes are stored in both forms.

Records: one LayerRecord per weight (bytes before/after), plus one per
excluded node; no QuantRecord (that record describes integer codes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import ml_dtypes
import networkx as nx
import numpy as np
import onnx
import onnx_ir as ir
from networkx.algorithms.flow import boykov_kolmogorov

from passes.cleanup._shape_inference import infer_missing_shapes
from passes.quantize.core import LayerRecord, QuantContext, ensure_node_names
from passes.quantize.rewrite import opset

#: weights with fewer elements are not recorded, and stay float32 in storage-only form
MIN_ELEMENTS = 256
#: element count assumed for a symbolic dim, and for a value of unknown shape, when weighing Casts
SYMBOLIC_DIM = 64
UNKNOWN_ELEMENTS = SYMBOLIC_DIM**3
#: a node kept float32 for no rule costs this fraction of its output size (ties go to the low type)
LOW_PREFERENCE = 0.01
#: summing reductions over more than 2**p * this many elements stay float32
REDUCTION_SHARE = 1 / 16
#: values captured per onnxruntime session when measuring ranges
CAPTURE_CHUNK = 512


@dataclasses.dataclass(frozen=True)
class Format:
    name: str  # "float16" | "bfloat16"
    dtype: ir.DataType
    numpy: Any
    max: float  # largest finite value
    precision: int  # significand bits, the implicit one included

    @property
    def onnx_type(self) -> str:
        return f"tensor({self.name})"

    def convert(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array, np.float32).astype(self.numpy)

    @property
    def reduction_limit(self) -> int:
        return int(2**self.precision * REDUCTION_SHARE)


FORMATS = {
    "float16": Format("float16", ir.DataType.FLOAT16, np.float16, float(np.finfo(np.float16).max), 11),
    "bfloat16": Format("bfloat16", ir.DataType.BFLOAT16, ml_dtypes.bfloat16,
                       float(ml_dtypes.finfo(ml_dtypes.bfloat16).max), 8),
}

#: ops worth running in the low type even between islands (compute-bound, or they read the weights)
ANCHOR_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum"})
#: ops kept float32 for precision, with why
SENSITIVE_OPS = {
    "Softmax": "softmax input precision",
    "LogSoftmax": "softmax input precision",
    "Pow": "powers leave the range",
    "Exp": "exponentials leave the range",
    "Cos": "argument precision",
    "Sin": "argument precision",
    "ReduceProd": "products leave the range",
    "InstanceNormalization": "normalization statistics",
}
#: ops whose input, not only the op, must be float32: the elementwise chain computing it stays float32 too
INPUT_SENSITIVE = frozenset({"Softmax", "LogSoftmax", "Cos", "Sin"})
#: ops a sensitive input is traced back through (elementwise arithmetic and data movement)
PASS_THROUGH = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Where", "Reshape", "Transpose", "Expand", "Slice", "Unsqueeze", "Squeeze",
    "Flatten", "Concat", "Identity", "Cast", "Tile", "Gather",
})
#: ops that sum over their reduced elements (kept float32 past the format's reduction limit)
SUMMING_REDUCTIONS = frozenset({
    "ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
    "CumSum", "GlobalAveragePool", "GlobalLpPool",
})
#: ops whose output does not inherit an input's out-of-range magnitude (no calibration: taint stops here)
RANGE_BOUNDING = frozenset({
    "Sqrt", "Log", "Reciprocal", "Softmax", "LogSoftmax", "Sigmoid", "Tanh", "Erf", "Sin", "Cos", "HardSigmoid",
    "Sign", "Softsign",
})
#: ops that can turn in-range values into out-of-range ones (no calibration: their outputs are presumed out of range)
RANGE_EXPANDING = frozenset({"Pow", "Exp"})
#: ops that read float inputs for their shape or pass any dtype through
AGNOSTIC_INPUTS = frozenset({"Shape", "Size", "Cast"})


def apply(scheme: Any, model: ir.Model, ctx: QuantContext) -> list[LayerRecord]:
    ensure_node_names(model.graph)
    fmt = FORMATS[scheme.dtype]
    limit = scheme.overflow_margin * fmt.max
    if computes_in(ctx.spec, fmt.name):
        return convert_compute(model, fmt, limit, ctx, scheme.spec())
    return convert_storage(model, fmt, limit, ctx, scheme.spec())


def computes_in(spec: Any, dtype: str) -> bool:
    """Whether the target's device has ``dtype`` arithmetic (else the weights are stored in it only)."""
    return spec is not None and dtype in getattr(spec, "dtypes", ())


def runs_on_cpu_provider(scheme: Any, spec: Any) -> bool:
    """Whether onnxruntime's CPU provider can run the converted model (it has no bfloat16 arithmetic kernels,
    so the bfloat16 compute form runs only where the target's runtime has them, e.g. the CUDA provider)."""
    return not (scheme.dtype == "bfloat16" and computes_in(spec, "bfloat16"))


# --------------------------------------------------------------------------- storage-only form


def convert_storage(model: ir.Model, fmt: Format, limit: float, ctx: QuantContext, label: str) -> list[LayerRecord]:
    """Weights stored in ``fmt`` with a Cast to float32 in front of their consumers; compute stays float32."""
    graph = model.graph
    names = Names(graph)
    records: list[LayerRecord] = []
    position = _positions(graph)
    for value in list(graph.initializers.values()):
        array = _float_initializer(value)
        if array is None or array.size < MIN_ELEMENTS:
            continue
        uses = list(value.uses())
        if not uses:
            continue
        first = min((u.node for u in uses), key=lambda n: position.get(id(n), 1 << 62))
        record = _record(first, value, label)
        kept = [u for u in uses if u.node.name in ctx.exclude or u.node.graph is not graph]
        peak = float(np.max(np.abs(array)))
        if peak > limit or len(kept) == len(uses):
            record.scheme = "float32"
            record.note = (f"max |w| {peak:.4g} exceeds the {fmt.name} limit {limit:.4g}" if peak > limit
                           else "excluded")
            records.append(record)
            continue
        low = _add_initializer(graph, names, f"{value.name}_{fmt.name}", fmt.convert(array))
        cast = _cast(names, low, ir.DataType.FLOAT, f"{value.name}_{fmt.name}_to_float32", value.shape)
        graph.insert_before(min((u.node for u in uses if u not in kept), key=lambda n: position.get(id(n), 1 << 62)),
                            cast)
        for use in uses:
            if use not in kept:
                use.node.replace_input_with(use.idx, cast.outputs[0])
        if not kept and not value.is_graph_output():
            graph.initializers.pop(value.name)
        record.bytes_after = low.const_value.nbytes + (value.const_value.nbytes if kept else 0)
        record.note = f"stored as {fmt.name}, computed in float32 (the {_device(ctx)} has no {fmt.name})"
        records.append(record)
    records.extend(_excluded_records(graph, ctx, records))
    ctx.log(f"{fmt.name}: {sum(r.scheme != 'float32' for r in records)} weight(s) stored as {fmt.name}, "
            "computed in float32")
    return records


# --------------------------------------------------------------------------- compute form


@dataclasses.dataclass
class Slots:
    """Which float (float32) inputs and outputs of a node follow its precision.

    Inputs not listed in ``low_in`` or ``f32_in`` read any dtype (Shape, Cast)
    or are not float. Float outputs not in ``low_out`` stay float32.
    """

    low_in: tuple[int, ...] = ()
    f32_in: tuple[int, ...] = ()
    low_out: tuple[int, ...] = ()

    @property
    def switchable(self) -> bool:
        return bool(self.low_in or self.low_out)


def convert_compute(model: ir.Model, fmt: Format, limit: float, ctx: QuantContext, label: str) -> list[LayerRecord]:
    graph = model.graph
    version = opset(model)
    nodes = list(graph)
    _restore_shapes(_infer(model))  # element types for every value (what infer-types does)
    measured = measured_out_of_range(model, nodes, limit, ctx) if ctx.calibration is not None else None
    undo = _infer(model)  # shapes too, for the decisions only: onnxruntime may reject inferred shapes
    try:
        slots = {id(n): node_slots(n, version, fmt) for n in nodes}
        forced = islands(model, nodes, slots, fmt, limit, ctx, measured)
        low = partition(graph, nodes, slots, forced)
        records = _weight_records(graph, nodes, slots, low, forced, label)
    finally:
        _restore_shapes(undo)
    casts = rewrite(graph, nodes, slots, low, fmt)
    records.extend(_excluded_records(graph, ctx, records))
    reasons: dict[str, int] = {}
    for why in forced.values():
        reasons[why] = reasons.get(why, 0) + 1
    kept = sum(1 for n in nodes if slots[id(n)].switchable and id(n) not in low)
    ctx.log(f"{fmt.name}: {len(low)} node(s) in {fmt.name}, {kept} kept float32 "
            f"({', '.join(f'{k}: {v}' for k, v in sorted(reasons.items()))}), {casts} Cast(s) added")
    return records


def _infer(model: ir.Model) -> list:
    undo: list = []
    infer_missing_shapes(model, undo)
    return undo


def _restore_shapes(undo: list) -> None:
    """Put back the shapes inference replaced; keep the element types it found for untyped values."""
    for value, old_type, old_shape in reversed(undo):
        value.shape = old_shape
        if old_type is not None:
            value.type = old_type


def node_slots(node: ir.Node, version: int, fmt: Format) -> Slots:
    """The node's float slots per the ONNX schema at the model's opset (float32 only where the schema says so)."""
    float_in = tuple(i for i, v in enumerate(node.inputs) if v is not None and v.dtype == ir.DataType.FLOAT)
    float_out = tuple(i for i, v in enumerate(node.outputs) if v.dtype == ir.DataType.FLOAT)
    if not float_in and not float_out:
        return Slots()
    opaque = Slots(f32_in=float_in)
    if node.domain not in ("", "ai.onnx") or any(
        a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()
    ):
        return opaque
    op = node.op_type
    if op in AGNOSTIC_INPUTS:
        if op == "Cast" and node.attributes.get_int("to", 0) == ir.DataType.FLOAT.value:
            return Slots(low_out=(0,))
        return Slots()
    if op == "Constant":
        value = node.attributes.get("value")
        ok = value is not None and value.type == ir.AttributeType.TENSOR and float_out == (0,)
        return Slots(low_out=(0,)) if ok else opaque
    if op == "ConstantOfShape":
        value = node.attributes.get("value")
        ok = float_out == (0,) and (value is None or value.type == ir.AttributeType.TENSOR)
        return Slots(low_out=(0,)) if ok else opaque
    try:
        schema = onnx.defs.get_schema(op, version, "")
    except onnx.defs.SchemaError:
        return opaque
    allowed = {c.type_param_str: fmt.onnx_type in c.allowed_type_strs for c in schema.type_constraints}
    in_params = _formal_types(schema.inputs, len(node.inputs))
    out_params = _formal_types(schema.outputs, len(node.outputs))
    # a type parameter switches when the schema allows the low type, an input carries it (outputs typed
    # by an attribute do not follow), and every actual carrying it is float32 now
    carried = {p for i, p in enumerate(in_params) if node.inputs[i] is not None}
    switch = {p for p, ok in allowed.items() if ok and p in carried}
    for params, values in ((in_params, node.inputs), (out_params, node.outputs)):
        for p, v in zip(params, values):
            if v is not None and p in switch and v.dtype != ir.DataType.FLOAT:
                switch.discard(p)
    low_in = tuple(i for i in float_in if in_params[i] in switch)
    return Slots(low_in=low_in, f32_in=tuple(i for i in float_in if i not in low_in),
                 low_out=tuple(i for i in float_out if out_params[i] in switch))


def _formal_types(formals: Any, count: int) -> list[str]:
    types = [f.type_str for f in formals]
    if formals and formals[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
        types += [types[-1]] * max(0, count - len(types))
    return (types + [""] * count)[:count]


def islands(model: ir.Model, nodes: list[ir.Node], slots: dict[int, Slots], fmt: Format, limit: float,
            ctx: QuantContext, measured: dict[ir.Value, float] | None = None) -> dict[int, str]:
    """id(node) -> why the node must stay float32 (only nodes that could switch are listed).

    ``measured``: the values calibration found beyond ``limit`` (None: no calibration).
    """
    forced: dict[int, str] = {}
    graph = model.graph

    def force(node: ir.Node, why: str) -> None:
        if slots[id(node)].switchable and id(node) not in forced:
            forced[id(node)] = why

    for node in nodes:
        if node.name in ctx.exclude:
            force(node, "excluded")
        why = _sensitivity(node, fmt)
        if why:
            force(node, why)
            if node.op_type in INPUT_SENSITIVE:
                for producer in _feeding(graph, node):
                    force(producer, why)
    for value in out_of_range(model, nodes, limit, measured):
        why = f"values beyond the {fmt.name} range"
        if value.producer() is not None and value.producer().graph is graph:
            force(value.producer(), why)
        for use in value.uses():
            if use.node.graph is graph:
                force(use.node, why)
    return forced


def _feeding(graph: ir.Graph, node: ir.Node) -> list[ir.Node]:
    """The nodes computing ``node``'s float input: back through elementwise and data-movement ops, up to and
    including the weightless MatMul that made it (Q @ K^T for a softmax), stopping at anything else."""
    found: list[ir.Node] = []
    seen: set[int] = set()
    queue = [v for v in node.inputs if v is not None and v.dtype == ir.DataType.FLOAT]
    while queue:
        producer = queue.pop().producer()
        if producer is None or producer.graph is not graph or id(producer) in seen:
            continue
        seen.add(id(producer))
        activations = [v for v in producer.inputs if v is not None and v.dtype == ir.DataType.FLOAT
                       and not v.is_initializer() and v.const_value is None]
        if producer.op_type in ANCHOR_OPS:
            if not any(_is_weight(v) for v in producer.inputs):
                found.append(producer)  # Q @ K^T, positions @ inv_freq: the product is the sensitive value
            continue
        if producer.op_type in PASS_THROUGH:
            found.append(producer)
            queue.extend(activations)
    return found


def _sensitivity(node: ir.Node, fmt: Format) -> str | None:
    op = node.op_type
    if op in SENSITIVE_OPS:
        return SENSITIVE_OPS[op]
    if op == "LayerNormalization" and node.attributes.get_int("stash_type", 1) != ir.DataType.FLOAT.value:
        return "normalization statistics"
    if op in SUMMING_REDUCTIONS:
        count = reduced_count(node)
        if count is None or count > fmt.reduction_limit:
            return "long reduction"
    return None


def reduced_count(node: ir.Node) -> int | None:
    """How many elements each output element of a reduction sums, or None when unknown."""
    data = node.inputs[0] if node.inputs else None
    if data is None or data.shape is None:
        return None
    dims = list(data.shape)
    op = node.op_type
    if op in ("GlobalAveragePool", "GlobalLpPool"):
        axes = list(range(2, len(dims)))
    elif op == "CumSum":
        axis = _const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
        if not axis:
            return None
        axes = [axis[0]]
    else:
        axes = node.attributes.get_ints("axes", None)
        if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
            axes = _const_ints(node.inputs[1])
            if axes is None:
                return None
        if not axes:
            if node.attributes.get_int("noop_with_empty_axes", 0):
                return 1
            axes = list(range(len(dims)))
    count = 1
    for axis in axes:
        dim = dims[axis % len(dims)] if dims else 1
        if not isinstance(dim, int):
            return None
        count *= dim
    return count


def _const_ints(value: ir.Value | None) -> list[int] | None:
    if value is None:
        return None
    tensor = value.const_value
    producer = value.producer()
    if tensor is None and producer is not None and producer.op_type == "Constant":
        attr = producer.attributes.get("value")
        tensor = attr.value if attr is not None and attr.type == ir.AttributeType.TENSOR else None
    if tensor is None:
        return None
    return [int(x) for x in np.asarray(tensor.numpy()).ravel()]


def out_of_range(model: ir.Model, nodes: list[ir.Node], limit: float,
                 measured: dict[ir.Value, float] | None) -> dict[ir.Value, float]:
    """Float values of the main graph whose |x| exceeds ``limit`` (value -> peak; inf when presumed)."""
    graph = model.graph
    found: dict[ir.Value, float] = {}
    sources: list[ir.Value] = []
    for value in graph.initializers.values():  # weights and constants: certain
        array = _float_initializer(value)
        if array is not None and array.size and (peak := float(np.max(np.abs(array)))) > limit:
            found[value] = peak
            sources.append(value)
    for node in nodes:
        if node.op_type == "Constant" and node.outputs and node.outputs[0].dtype == ir.DataType.FLOAT:
            attr = node.attributes.get("value")
            if attr is not None and attr.type == ir.AttributeType.TENSOR:
                array = np.asarray(attr.value.numpy(), np.float32)
                if array.size and (peak := float(np.max(np.abs(array)))) > limit:
                    found[node.outputs[0]] = peak
                    sources.append(node.outputs[0])
    if measured is not None:
        found.update(measured)
    else:
        for node in nodes:
            if node.op_type in RANGE_EXPANDING and _expands(node):
                for out in node.outputs:
                    if out.dtype == ir.DataType.FLOAT and out not in found:
                        found[out] = float("inf")
                        sources.append(out)
    # what these values flow into keeps their magnitude, up to an op that bounds it
    queue = list(sources)
    while queue:
        value = queue.pop()
        for use in value.uses():
            node = use.node
            if node.graph is not graph or node.op_type in RANGE_BOUNDING:
                continue
            for out in node.outputs:
                if out.dtype == ir.DataType.FLOAT and out not in found:
                    found[out] = found[value]
                    queue.append(out)
    return found


def _expands(node: ir.Node) -> bool:
    """Exp always; Pow unless its exponent is a constant in (0, 1] (roots do not leave the range)."""
    if node.op_type != "Pow":
        return True
    exponent = node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if exponent is None:
        return True
    e = np.asarray(exponent.numpy(), np.float64)
    return bool(np.any((e <= 0) | (e > 1)))


def measured_out_of_range(model: ir.Model, nodes: list[ir.Node], limit: float,
                          ctx: QuantContext) -> dict[ir.Value, float]:
    from passes.quantize.capture import capture

    values = {out.name: out for node in nodes for out in node.outputs
              if out.name and out.dtype == ir.DataType.FLOAT}
    peaks: dict[str, float] = {}
    batches = ctx.calibration
    with ctx.progress("measuring value ranges", len(batches) if hasattr(batches, "__len__") else None) as bar:
        for result in capture(model, list(values), batches, chunk=CAPTURE_CHUNK):
            for name, array in result.items():
                if name in values and array.size and np.asarray(array).dtype.kind == "f":
                    with np.errstate(invalid="ignore"):
                        peak = float(np.nanmax(np.abs(array))) if not np.all(np.isnan(array)) else 0.0
                    peaks[name] = max(peaks.get(name, 0.0), peak)
            bar.update(1)
    return {values[name]: peak for name, peak in peaks.items() if peak > limit}


# --------------------------------------------------------------------------- which nodes run low: a minimum cut


def partition(graph: ir.Graph, nodes: list[ir.Node], slots: dict[int, Slots], forced: dict[int, str]) -> set[int]:
    """id(node) of the nodes that run in the low type.

    A flow network with source LOW and sink F32: anchors hang off LOW, islands
    off F32, other switchable nodes off LOW with a small preference; each float
    value is a hyperedge (producer + consumer slots) that costs its element
    count when its members disagree (one Cast), encoded as Lawler's pair of
    auxiliary nodes. The minimum cut is the cheapest assignment.
    """
    net = nx.DiGraph()
    net.add_nodes_from(("LOW", "F32"))
    weights = _weight_readers(graph, nodes, slots)
    for node in nodes:
        key = id(node)
        if not slots[key].switchable:
            continue
        if key in forced:
            net.add_edge(key, "F32")  # no capacity: infinite
        elif node.op_type in ANCHOR_OPS or key in weights:
            net.add_edge("LOW", key)
        else:
            net.add_edge("LOW", key, capacity=LOW_PREFERENCE * _node_size(node))
    for i, (value, members) in enumerate(_hyperedges(graph, nodes, slots)):
        if len(members) < 2:
            continue
        a, b = ("in", i), ("out", i)
        net.add_edge(a, b, capacity=float(_elements(value)))
        for member in members:
            net.add_edge(member, a)
            net.add_edge(b, member)
    _, (low_side, _) = nx.minimum_cut(net, "LOW", "F32", flow_func=boykov_kolmogorov)
    return {key for key in low_side if isinstance(key, int)}


def _hyperedges(graph: ir.Graph, nodes: list[ir.Node], slots: dict[int, Slots]) -> Iterable[tuple[ir.Value, set]]:
    """Each float activation with the precision sides its producer and consumers stand on (node id or F32)."""
    values: list[ir.Value] = [v for v in graph.inputs if v.dtype == ir.DataType.FLOAT]
    values += [out for n in nodes for out in n.outputs if out.dtype == ir.DataType.FLOAT]
    for value in values:
        producer = value.producer()
        members: set = set()
        if producer is None or producer.graph is not graph:
            members.add("F32")
        else:
            members.add(id(producer) if value.index() in slots[id(producer)].low_out else "F32")
        for use in value.uses():
            side = _consumer_side(graph, use, slots)
            if side is not None:
                members.add(side)
        if value.is_graph_output():
            members.add("F32")
        yield value, members


def _consumer_side(graph: ir.Graph, use: Any, slots: dict[int, Slots]) -> int | str | None:
    node = use.node
    if node.graph is not graph:
        return "F32"
    s = slots[id(node)]
    if use.idx in s.low_in:
        return id(node)
    if use.idx in s.f32_in:
        return "F32"
    return None  # reads any dtype


def _weight_readers(graph: ir.Graph, nodes: list[ir.Node], slots: dict[int, Slots]) -> set[int]:
    readers = set()
    for node in nodes:
        for i in slots[id(node)].low_in:
            if _is_weight(node.inputs[i]):
                readers.add(id(node))
    return readers


def _is_weight(value: ir.Value | None) -> bool:
    """A float initializer big enough to count as a layer's weight (not a scalar or a small constant)."""
    return value is not None and value.is_initializer() and not value.is_graph_input() \
        and value.const_value is not None and value.const_value.dtype == ir.DataType.FLOAT \
        and value.const_value.size >= MIN_ELEMENTS


def _elements(value: ir.Value) -> int:
    if value.shape is None:
        return UNKNOWN_ELEMENTS
    count = 1
    for dim in value.shape:
        count *= dim if isinstance(dim, int) else SYMBOLIC_DIM
    return max(count, 1)


def _node_size(node: ir.Node) -> int:
    sizes = [_elements(v) for v in node.outputs if v.dtype == ir.DataType.FLOAT]
    return max(sizes) if sizes else 1


# --------------------------------------------------------------------------- the rewrite


def rewrite(graph: ir.Graph, nodes: list[ir.Node], slots: dict[int, Slots], low: set[int], fmt: Format) -> int:
    """Switch the low nodes' types and attributes, convert the weights they read, Cast at every boundary.

    Returns the number of Casts added.
    """
    names = Names(graph)
    # the sides are decided before any type changes
    plans = []
    for value, _ in _hyperedges(graph, nodes, slots):
        producer = value.producer()
        produced_low = (producer is not None and id(producer) in low and producer.graph is graph
                        and value.index() in slots[id(producer)].low_out)
        other = [u for u in value.uses() if _needs_low(graph, u, slots, low) is (not produced_low)
                 and _consumer_side(graph, u, slots) is not None]
        plans.append((value, produced_low, other))
    for node in nodes:
        if id(node) in low:
            _switch_node(node, slots[id(node)], fmt)
    casts = 0
    for value, produced_low, other in plans:
        if produced_low and value.is_graph_output():
            casts += 1
            uplifted = _cast_graph_output(graph, names, value, fmt)
            for use in other:
                use.node.replace_input_with(use.idx, uplifted)
            continue
        if not other:
            continue
        casts += 1
        target = ir.DataType.FLOAT if produced_low else fmt.dtype
        suffix = "float32" if produced_low else fmt.name
        cast = _cast(names, value, target, f"{value.name}_{suffix}", value.shape)
        _insert_after_producer(graph, value, cast)
        for use in other:
            use.node.replace_input_with(use.idx, cast.outputs[0])
    _convert_weights(graph, names, slots, low, fmt)
    return casts


def _needs_low(graph: ir.Graph, use: Any, slots: dict[int, Slots], low: set[int]) -> bool:
    node = use.node
    return node.graph is graph and id(node) in low and use.idx in slots[id(node)].low_in


def _switch_node(node: ir.Node, s: Slots, fmt: Format) -> None:
    for i in s.low_out:
        node.outputs[i].type = ir.TensorType(fmt.dtype)
    op = node.op_type
    if op == "Cast":
        node.attributes["to"] = ir.AttrInt64("to", fmt.dtype.value)
    elif op in ("Constant", "ConstantOfShape"):
        attr = node.attributes.get("value")
        array = np.zeros(1, np.float32) if attr is None else np.asarray(attr.value.numpy(), np.float32)
        node.attributes["value"] = ir.AttrTensor("value", ir.tensor(fmt.convert(array)))


def _convert_weights(graph: ir.Graph, names: Names, slots: dict[int, Slots], low: set[int], fmt: Format) -> None:
    """Low readers of a float initializer get its low copy; float32 readers keep the original."""
    for value in list(graph.initializers.values()):
        array = _float_initializer(value)
        if array is None:
            continue
        uses = list(value.uses())
        low_uses = [u for u in uses if _needs_low(graph, u, slots, low)]
        if not low_uses:
            continue
        if len(low_uses) == len(uses) and not value.is_graph_output():
            value.const_value = ir.tensor(fmt.convert(array), name=value.name)
            value.type = ir.TensorType(fmt.dtype)
            continue
        copy = _add_initializer(graph, names, f"{value.name}_{fmt.name}", fmt.convert(array))
        for use in low_uses:
            use.node.replace_input_with(use.idx, copy)


class Names:
    """Unique names for the values and nodes the conversion adds (the graph's own are collected once)."""

    def __init__(self, graph: ir.Graph) -> None:
        self.values = {v.name for v in graph.inputs} | set(graph.initializers)
        self.values |= {o.name for n in graph.all_nodes() for o in n.outputs if o.name}
        self.nodes = {n.name for n in graph if n.name}

    def value(self, hint: str) -> str:
        return self._take(self.values, hint)

    def node(self, hint: str) -> str:
        return self._take(self.nodes, hint)

    @staticmethod
    def _take(taken: set[str], hint: str) -> str:
        name, i = hint, 0
        while name in taken:
            i += 1
            name = f"{hint}_{i}"
        taken.add(name)
        return name


def _cast(names: Names, value: ir.Value, to: ir.DataType, hint: str, shape: ir.Shape | None,
          output: str | None = None) -> ir.Node:
    node = ir.Node("", "Cast", [value], [ir.AttrInt64("to", to.value)], name=names.node(f"{hint}_cast"),
                   num_outputs=1)
    out = node.outputs[0]
    out.name = output or names.value(hint)
    out.type = ir.TensorType(to)
    out.shape = shape.copy() if shape is not None else None
    return node


def _insert_after_producer(graph: ir.Graph, value: ir.Value, cast: ir.Node) -> None:
    producer = value.producer()
    if producer is not None and producer.graph is graph:
        graph.insert_after(producer, cast)
    else:
        first = next(iter(graph), None)
        if first is None:
            graph.append(cast)
        else:
            graph.insert_before(first, cast)


def _cast_graph_output(graph: ir.Graph, names: Names, value: ir.Value, fmt: Format) -> ir.Value:
    """The producer's output gets a new name; a Cast to float32 produces the graph output under the old one."""
    name = value.name
    value.name = names.value(f"{name}_{fmt.name}")
    cast = _cast(names, value, ir.DataType.FLOAT, name, value.shape, output=name)
    _insert_after_producer(graph, value, cast)
    for i, out in enumerate(list(graph.outputs)):
        if out is value:
            graph.outputs[i] = cast.outputs[0]
    return cast.outputs[0]


# --------------------------------------------------------------------------- records and helpers


def _weight_records(graph: ir.Graph, nodes: list[ir.Node], slots: dict[int, Slots], low: set[int],
                    forced: dict[int, str], label: str) -> list[LayerRecord]:
    """One record per weight, written before the rewrite (names and byte counts as they will be)."""
    position = {id(n): i for i, n in enumerate(nodes)}
    records = []
    for value in graph.initializers.values():
        array = _float_initializer(value)
        if array is None or array.size < MIN_ELEMENTS:
            continue
        uses = [u for u in value.uses() if u.node.graph is graph]
        if not uses:
            continue
        first = min((u.node for u in uses), key=lambda n: position.get(id(n), 1 << 62))
        record = _record(first, value, label)
        low_uses = [u for u in uses if _needs_low(graph, u, slots, low)]
        keeps_float = len(low_uses) < len(list(value.uses()))
        if not low_uses:
            record.scheme = "float32"
            record.note = next((forced[id(u.node)] for u in uses if id(u.node) in forced), "read in float32")
        else:
            record.bytes_after = array.size * 2 + (array.nbytes if keeps_float else 0)
            if keeps_float:
                record.note = "also kept in float32 for float32 readers"
        records.append(record)
    return records


def _record(node: ir.Node, weight: ir.Value, label: str) -> LayerRecord:
    nbytes = weight.const_value.nbytes
    return LayerRecord(node=node.name, op=node.op_type, scheme=label, output=node.outputs[0].name,
                       weight=weight.name, bytes_before=nbytes, bytes_after=nbytes)


def _excluded_records(graph: ir.Graph, ctx: QuantContext, records: list[LayerRecord]) -> list[LayerRecord]:
    named = {r.node for r in records}
    return [LayerRecord(node=n.name, op=n.op_type, scheme="float32", output=n.outputs[0].name if n.outputs else "",
                        note="excluded")
            for n in graph if n.name in ctx.exclude and n.name not in named]


def _float_initializer(value: ir.Value) -> np.ndarray | None:
    tensor = value.const_value
    if tensor is None or value.is_graph_input() or tensor.dtype != ir.DataType.FLOAT:
        return None
    return np.asarray(tensor.numpy(), np.float32)


def _add_initializer(graph: ir.Graph, names: Names, hint: str, array: np.ndarray) -> ir.Value:
    name = names.value(hint)
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _positions(graph: ir.Graph) -> dict[int, int]:
    return {id(n): i for i, n in enumerate(graph)}


def _device(ctx: QuantContext) -> str:
    spec = ctx.spec
    return f"{spec.name} {spec.device_string}" if spec is not None else "target"
