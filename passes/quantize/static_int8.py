"""Static W8A8 (``int8``): 8-bit per-channel weights, 8-bit activations calibrated per tensor, as QDQ.

Weights of Conv / Gemm / MatMul (constant, float) become symmetric 8-bit codes
per output channel behind a DequantizeLinear; biases become int32 with scale
``input_scale * weight_scale`` (what QLinearConv and QGemm take), corrected for
the mean output shift the weight rounding causes. Activations get a
QuantizeLinear -> DequantizeLinear pair whose range the chosen observer
(``passes.quantize.observers``) measured on the calibration data. onnxruntime's
QDQ fusion turns ``DQ -> Conv -> [Relu|Clip] -> Q`` into QLinearConv,
``DQ -> Add -> Q`` into QLinearAdd, ``DQ -> Gemm`` into QGemm and
``DQ -> MatMul`` into MatMulIntegerToFloat.

Where the pairs go, and how the codes are stored, decide speed and accuracy
(``Placement``; measurements in ``bench/_quant_effnet.py`` and the report of
the work that added this module):

- activations are uint8. The 8-bit codes of GEMM-like layers (1x1 and regular
  convs, Gemm, MatMul) are stored as uint8 with zero point 128 (the same
  symmetric values): x86 CPUs without AVX-512 VNNI run onnxruntime's U8S8
  kernels with int16 pair sums that saturate (EfficientNet-Lite0: top-1
  agreement 0.66 instead of 0.96), U8U8 kernels are exact everywhere.
  Depthwise convs keep int8 codes (their kernel accumulates in 32 bits);
- the inputs of every quantized layer and the outputs of quantized convs are
  quantized (onnxruntime only fuses a Conv with a Q after it), so a residual
  Add between them runs as QLinearAdd; a Relu / constant Clip right after a
  conv is absorbed (the pair sits on its output, which makes it redundant);
- graph outputs are never quantized (quantized logits round away the top-1
  margin); activation x activation MatMuls (attention) stay float;
- the first convs of an image model (its stem) stay float: a few thousand
  weights whose quantization noise the whole network amplifies;
- MatMul inputs are smoothed first (SmoothQuant): transformer hidden states
  have outlier channels that would otherwise set every per-tensor range.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from compiler.errors import KilnError
from compiler.ir.quant import QuantRecord
from passes.quantize import numerics, observers
from passes.quantize.capture import capture
from passes.quantize.core import LayerRecord, QuantContext, ensure_node_names
from passes.quantize.rewrite import add_initializer, dequantize_node, unique_name, unique_node_name

#: ops that only move or reshape data: their output reuses their input's quantization
PASS_THROUGH = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"})
#: largest |int32 bias code| allowed before the weight scale is widened (headroom for bias correction)
BIAS_CODE_LIMIT = 2**30
#: activations absorbed into the quantized op before them
ABSORBED = frozenset({"Relu", "Clip"})


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where Q/DQ pairs go and how weights are stored. The defaults are the forms measured best
    (accuracy first, then onnxruntime speed; numbers in bench/_quant_effnet.py)."""

    activation_dtype: str = "uint8"  # "uint8" (U8 kernels) or "int8" (S8S8)
    #: "auto": uint8 codes (zero point 128) for GEMM-like layers, int8 for depthwise convs; "int8"; "uint8"
    weight_storage: str = "auto"
    depthwise: bool = True  # quantize depthwise (group == channels) convs
    per_channel: bool = True  # per-channel (else per-tensor) weight scales
    reduce_range: bool = False  # 7-bit weight codes
    narrow: str = "none"  # 7-bit activation codes: "none", "all", or "gemm" (inputs of GEMM-like layers)
    bias_correction: bool = True  # subtract the weight rounding's mean output shift from the bias
    #: the first N convs in graph order stay float (an image model's stem; at most a tenth of its convs)
    float_stem: int = 3
    #: SmoothQuant migration strength for MatMul inputs (0 = off): activation outlier channels
    #: are divided by s = max|x|^a / max|w|^(1-a), the weight rows multiplied by it
    smooth: float = 0.8


@dataclasses.dataclass
class _Target:
    node: ir.Node
    kind: str  # "conv" | "gemm" | "matmul"
    weight: ir.Value
    axis: int  # the weight's output-channel axis
    out: ir.Value  # the value after the node and any absorbed Relu/Clip


def apply(scheme, model: ir.Model, ctx: QuantContext, placement: Placement | None = None) -> list[LayerRecord]:
    placement = placement or Placement()
    if ctx.calibration is None:
        raise KilnError(f"--quantize {scheme.spec()}: static int8 calibrates activation ranges and needs "
                        "calibration data (--calibration PATH)")
    ensure_node_names(model.graph)
    graph = model.graph
    records: list[LayerRecord] = []
    if placement.smooth > 0:
        _smooth(model, scheme, ctx, placement.smooth)
    targets = []
    kept_float: set[int] = set()  # layers left in float read float inputs (see _insert_qdq)
    convs = 0
    # the stem rule is for deep image models: at most a tenth of the convs stay float
    all_convs = sum(1 for n in graph if n.op_type == "Conv" and _target(n) is not None)
    stem = min(placement.float_stem, all_convs // 10)
    for node in graph:
        target = _target(node)
        if target is None:
            continue
        convs += target.kind == "conv"
        if node.name in ctx.exclude:
            note = "kept in float (accuracy budget)"
        elif target.kind == "conv" and convs <= stem:
            note = "kept in float (the network's stem)"
        elif target.kind == "conv" and _is_depthwise(target) and not placement.depthwise:
            note = "depthwise conv kept in float"
        else:
            targets.append(target)
            continue
        records.append(_record(target, "float32", note))
        kept_float.add(id(node))
    records += _embedding_tables(model, scheme, ctx)
    if not targets:
        return records
    plan = _plan(graph, targets, placement)
    ranges, means = _calibrate(model, plan, targets, scheme, ctx)
    narrow = _narrow_values(plan, targets, placement)
    params = {name: _activation_params(lo, hi, placement, 7 if name in narrow else 8)
              for name, (lo, hi) in ranges.items()}
    values = _values(graph)
    done: dict[str, tuple] = {}  # weight name -> (its DQ output, scale, bytes, rounding error)
    for target in targets:
        name = target.node.inputs[0].name
        mean = means[name] if placement.bias_correction else None
        records.append(_quantize_weights(graph, target, params[name], mean, scheme, placement, done))
    for name in plan.order:
        _insert_qdq(graph, values[name], *params[name], keep_float=kept_float)
    order = {node.name: i for i, node in enumerate(graph)}
    return sorted(records, key=lambda r: order.get(r.node, len(order)))


def _smooth(model: ir.Model, scheme, ctx: QuantContext, alpha: float) -> None:
    """SmoothQuant (Xiao et al., 2023): per-tensor activation ranges are set by a few outlier channels
    (transformer hidden states); dividing channel k of a MatMul input by s_k and multiplying the weight
    rows by s_k moves that range into the per-channel weight scales. 1/s folds into the producer
    (a norm's scale and bias, a bias Add, a MatMul's columns) or, failing that, an inserted Mul."""
    from passes.quantize import awq

    groups = [g for g in awq.find_groups(model, scheme, ctx)
              if all(u.consumer.op_type == "MatMul" for u in g.uses)]
    if not groups:
        return
    names = [g.x.name for g in groups]
    peaks: dict[str, np.ndarray] = {}
    with ctx.progress("smoothing activations", len(ctx.calibration)) as bar:
        for outputs in capture(model, names, ctx.calibration):
            for name in names:
                x = np.abs(np.asarray(outputs[name], np.float32))
                peak = x.reshape(-1, x.shape[-1]).max(axis=0)
                peaks[name] = peak if name not in peaks else np.maximum(peaks[name], peak)
            bar.update(1)
    for group in groups:
        rows = np.max([np.abs(u.array).max(axis=1 - u.reduce_axis) for u in group.uses], axis=0)
        x_peak = np.maximum(peaks[group.x.name], 1e-5)
        s = x_peak**alpha / np.maximum(rows, 1e-5) ** (1 - alpha)
        group.scales = np.clip(s, 1e-2, 1e2).astype(np.float32)
        group.alpha = alpha
        awq.scale_group(model.graph, group)


def _embedding_tables(model: ir.Model, scheme, ctx: QuantContext) -> list[LayerRecord]:
    """Gather tables (token embeddings) as 8-bit weight-only, per row: a lookup has no activation to quantize."""
    from passes.quantize import weight_only
    from passes.quantize.schemes import WeightOnly8

    records = []
    for use in weight_only.find_weights(model, kinds=("gather",)):
        record = weight_only.quantize_use(model, use, WeightOnly8(), ctx, weight_only.round_to_nearest)
        if record.scheme != "float32":
            record.scheme, record.note = scheme.spec(), "embedding table: 8-bit weight-only per row"
        records.append(record)
    return records


# --- which values get a Q/DQ pair -------------------------------------------------------------


@dataclasses.dataclass
class _Plan:
    order: list[str]  # values to quantize, in graph order
    aliases: dict[str, str]  # pass-through outputs -> the value whose range they reuse


def _plan(graph: ir.Graph, targets: list[_Target], placement: Placement) -> _Plan:
    chosen: dict[str, None] = {}
    for t in targets:
        chosen[t.node.inputs[0].name] = None
        if t.kind == "conv" and not t.out.is_graph_output():
            chosen[t.out.name] = None
    aliases = {}
    for node in graph:
        if node.op_type in PASS_THROUGH and node.outputs[0].name in chosen and node.inputs[0].name in chosen:
            aliases[node.outputs[0].name] = aliases.get(node.inputs[0].name, node.inputs[0].name)
    order = [v.name for v in _all_values(graph) if v.name in chosen]
    return _Plan(order, aliases)


def _all_values(graph: ir.Graph) -> Iterable[ir.Value]:
    yield from graph.inputs
    for node in graph:
        yield from node.outputs


def _values(graph: ir.Graph) -> dict[str, ir.Value]:
    return {v.name: v for v in _all_values(graph)}


# --- targets ---------------------------------------------------------------------------------


def _target(node: ir.Node) -> _Target | None:
    if node.domain not in ("", "ai.onnx") or not node.inputs or node.inputs[0] is None:
        return None
    op, ins = node.op_type, node.inputs
    if ins[0].const_value is not None or len(ins) < 2 or not _is_weight(ins[1]):
        return None
    if ins[0].dtype not in (None, ir.DataType.FLOAT):
        return None
    shape = ins[1].const_value.shape
    if op == "Conv" and len(shape) >= 3:
        kind, axis = "conv", 0
    elif op == "Gemm" and len(shape) == 2 and not node.attributes.get_int("transA", 0):
        if node.attributes.get_float("alpha", 1.0) != 1.0:
            return None
        kind, axis = "gemm", 0 if node.attributes.get_int("transB", 0) else 1
    elif op == "MatMul" and len(shape) == 2:
        kind, axis = "matmul", 1
    else:
        return None
    return _Target(node, kind, ins[1], axis, _absorb_activation(node.outputs[0]))


def _is_weight(value: ir.Value | None) -> bool:
    return (value is not None and value.const_value is not None and value.is_initializer()
            and not value.is_graph_input() and value.const_value.dtype == ir.DataType.FLOAT)


def _absorb_activation(value: ir.Value) -> ir.Value:
    """The output of a Relu / constant Clip that alone consumes ``value``, else ``value``."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return value
    nxt = uses[0].node
    if nxt.op_type not in ABSORBED or uses[0].idx != 0:
        return value
    if nxt.op_type == "Clip" and not all(v is None or v.const_value is not None for v in nxt.inputs[1:]):
        return value
    return nxt.outputs[0]


def _is_depthwise(target: _Target) -> bool:
    group = target.node.attributes.get_int("group", 1)
    return group > 1 and group == target.weight.const_value.shape[0]


def _record(target: _Target, scheme: str, note: str = "") -> LayerRecord:
    nbytes = target.weight.const_value.nbytes
    return LayerRecord(node=target.node.name, op=target.node.op_type, scheme=scheme,
                       output=target.node.outputs[0].name, weight=target.weight.name,
                       bytes_before=nbytes, bytes_after=nbytes, note=note)


# --- calibration -----------------------------------------------------------------------------


def _calibrate(model: ir.Model, plan: _Plan, targets: list[_Target], scheme, ctx: QuantContext
               ) -> tuple[dict[str, tuple[float, float]], dict[str, np.ndarray]]:
    """Over the calibration data: (lo, hi) of every planned value (pass-through aliases share their
    source's) and the per-channel mean of every target's input (for bias correction)."""
    sources = [n for n in plan.order if n not in plan.aliases]
    found = {name: observers.make(scheme.method, scheme.percentile) for name in sources}
    feeds = {name: [name] for name in sources}
    for alias, source in plan.aliases.items():
        feeds[source].append(alias)
    channel_axis = {t.node.inputs[0].name: (1 if t.kind == "conv" else -1) for t in targets}
    sums: dict[str, np.ndarray] = {}
    batches = ctx.calibration
    count = 0
    with ctx.progress(f"calibrating ({scheme.method})", len(batches)) as bar:
        for outputs in capture(model, list(dict.fromkeys([*plan.order, *channel_axis])), batches):
            for name, observer in found.items():
                for fed in feeds[name]:
                    observer.update(outputs[fed])
            for name, axis in channel_axis.items():
                x = np.moveaxis(np.asarray(outputs[name], np.float64), axis, 0)
                sums[name] = sums.get(name, 0.0) + x.reshape(x.shape[0], -1).mean(axis=1)
            count += 1
            bar.update(1)
    ranges = {name: found[name].range() for name in sources}
    ranges.update({alias: ranges[source] for alias, source in plan.aliases.items()})
    return ranges, {name: total / max(count, 1) for name, total in sums.items()}


def _activation_params(lo: float, hi: float, placement: Placement, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero) of an affine activation range over ``bits``-bit codes; zero is uint8 or int8 by ``placement``."""
    scale, zero = numerics.compute_params(np.zeros(1, np.float32), bits=bits, block_size=-1, symmetric=False,
                                          lo=np.float32(lo), hi=np.float32(hi))
    scale = np.float32(scale)
    top = (1 << bits) - 1
    if hi > 0 and np.float32(scale * (top - int(zero))) > np.float32(hi):
        # keep the top code inside [lo, hi], so onnxruntime sees a following Clip(lo', hi) as redundant
        scale = np.nextafter(scale, np.float32(0))
    if placement.activation_dtype == "int8":
        return np.asarray(scale, np.float32), np.asarray(int(zero) - (1 << (bits - 1)), np.int8)
    return np.asarray(scale, np.float32), np.asarray(zero, np.uint8)


def _narrow_values(plan: _Plan, targets: list[_Target], placement: Placement) -> set[str]:
    """Values quantized to 7 bits: all (``narrow="all"``), the inputs of GEMM-like kernels (``"gemm"``), none."""
    if placement.narrow == "all":
        return set(plan.order)
    if placement.narrow != "gemm":
        return set()
    chosen = {t.node.inputs[0].name for t in targets if not (t.kind == "conv" and _is_depthwise(t))}
    groups: dict[str, set[str]] = {}
    for alias, source in plan.aliases.items():
        groups.setdefault(source, {source}).add(alias)
    for source, members in groups.items():
        if members & chosen:
            chosen |= members
    return chosen


# --- rewriting -------------------------------------------------------------------------------


def _insert_qdq(graph: ir.Graph, value: ir.Value, scale: np.ndarray, zero: np.ndarray,
                keep_float: set[int] = frozenset()) -> None:
    """``value -> QuantizeLinear -> DequantizeLinear``; every reader of ``value`` reads the DQ instead,
    except the layers left in float (``keep_float``, node ids), which keep reading ``value``.

    A float Conv/Gemm reading a DequantizeLinear and feeding a QuantizeLinear would not stay float:
    onnxruntime 1.32 (WeightBiasQuantization) quantizes its weights per tensor and fuses it. Reading
    the float value costs the producer its fusion instead. ``value`` keeps its name (the report
    compares it); graph outputs keep reading it.
    """
    uses = [(u.node, u.idx) for u in value.uses() if id(u.node) not in keep_float]
    if not uses:
        return
    base = value.name
    sv = add_initializer(graph, f"{base}_scale", scale)
    zv = add_initializer(graph, f"{base}_zero_point", zero)
    q = ir.Node("", "QuantizeLinear", [value, sv, zv], name=unique_node_name(graph, f"{base}_quantize"), num_outputs=1)
    q.outputs[0].name = unique_name(graph, f"{base}_quantized")
    q.outputs[0].type = ir.TensorType(ir.DataType.UINT8 if zero.dtype == np.uint8 else ir.DataType.INT8)
    q.outputs[0].shape = value.shape
    dq = ir.Node("", "DequantizeLinear", [q.outputs[0], sv, zv], name=unique_node_name(graph, f"{base}_dequantize"),
                 num_outputs=1)
    dq.outputs[0].name = unique_name(graph, f"{base}_dequantized")
    dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    dq.outputs[0].shape = value.shape
    producer = value.producer()
    if producer is None:
        first = min((n for n, _ in uses), key=_position(graph))
        graph.insert_before(first, [q, dq])
    else:
        graph.insert_after(producer, [q, dq])
    for node, idx in uses:
        node.replace_input_with(idx, dq.outputs[0])


def _position(graph: ir.Graph):
    order = {id(n): i for i, n in enumerate(graph)}
    return lambda n: order.get(id(n), 1 << 62)


def _quantize_weights(graph: ir.Graph, target: _Target, input_params: tuple[np.ndarray, np.ndarray],
                      input_mean: np.ndarray | None, scheme, placement: Placement,
                      done: dict[str, tuple]) -> LayerRecord:
    """Weight -> int8 DequantizeLinear (per channel), bias -> int32 DequantizeLinear; returns the record.

    A weight shared by several nodes is quantized once (``done``); every user reads the same DequantizeLinear.
    """
    node, weight = target.node, target.weight
    rec = _record(target, scheme.spec())
    if weight.name not in done:
        w = weight.const_value.numpy().astype(np.float32)
        bits = 7 if placement.reduce_range else 8
        block = 0 if placement.per_channel else -1
        scale, _ = numerics.compute_params(w, bits=bits, axis=target.axis, block_size=block, symmetric=True)
        bias = _bias(target)
        if bias is not None:
            # a (nearly) dead channel with a bias: widen its scale so the int32 bias codes stay in range
            floor = np.abs(bias.const_value.numpy()) / (float(input_params[0]) * BIAS_CODE_LIMIT)
            scale = np.maximum(scale, floor.max() if block == -1 else floor).astype(np.float32)
        q = numerics.quantize(w, scale, None, bits=bits, axis=target.axis, block_size=block, symmetric=True)
        error = numerics.dequantize(q, scale, None, axis=target.axis, block_size=block) - w
        record = QuantRecord(scheme=scheme.name, bits=8, block_size=block, axis=target.axis if block == 0 else 0)
        zero = None
        if _unsigned_weights(target, placement):
            record = dataclasses.replace(record, symmetric=False, zero_dtype="uint8")
            q = (q.astype(np.int16) + 128).astype(np.uint8)
            zero = np.full(scale.shape, 128, np.uint8)
        dq = dequantize_node(graph, _first_use(graph, weight), weight.name, q, scale, zero, axis=target.axis,
                             block_size=block, record=record)
        for use in list(weight.uses()):
            use.node.replace_input_with(use.idx, dq)
        graph.initializers.pop(weight.name, None)
        done[weight.name] = (dq, scale, q.size + scale.size * 4, error)
        rec.bytes_after = done[weight.name][2]
    else:
        rec.bytes_after = 0
        rec.note = f"shares the quantized weight {weight.name}"
    _, scale, _, error = done[weight.name]
    bias = _bias(target)
    if bias is not None:
        values = bias.const_value.numpy().astype(np.float64)
        rec.bytes_before += bias.const_value.nbytes
        if input_mean is not None:  # E[(W_q - W) x] per output channel
            values = values - _mean_shift(target, error, input_mean)
        rec.bytes_after += _quantize_bias(graph, node, bias, values, input_params[0] * scale)
    return rec


def _mean_shift(target: _Target, error: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Per output channel, the mean output the weight rounding ``error`` adds, given the input's channel means.

    For a conv this ignores the zero padding at the borders (the shift is then one constant per channel).
    """
    error = error.astype(np.float64)
    if target.kind != "conv":
        return error @ mean if target.axis == 0 else mean @ error
    cout, cin_group = error.shape[0], error.shape[1]
    groups = target.node.attributes.get_int("group", 1)
    per_input = error.reshape(cout, cin_group, -1).sum(axis=2)
    channel = (np.arange(cout) // (cout // groups))[:, None] * cin_group + np.arange(cin_group)[None, :]
    return (per_input * mean[channel]).sum(axis=1)


def _unsigned_weights(target: _Target, placement: Placement) -> bool:
    """Store the int8 codes as uint8 + 128? x86 without VNNI multiplies uint8 activations by int8 weights
    in int16 pairs that saturate (vpmaddubsw: 2 x 255 x 127 > 32767), so the U8S8 GEMM there rounds
    differently from the QDQ meaning; U8U8 GEMMs are exact everywhere. Depthwise kernels accumulate
    in 32 bits and keep int8."""
    if placement.weight_storage == "auto":
        return not (target.kind == "conv" and _is_depthwise(target))
    return placement.weight_storage == "uint8"


def _bias(target: _Target) -> ir.Value | None:
    """The node's float bias when it can become int32 codes (a constant vector of one value per channel)."""
    ins = target.node.inputs
    bias = ins[2] if len(ins) > 2 else None
    return bias if bias is not None and _is_weight(bias) and _bias_fits(target, bias) else None


def _bias_fits(target: _Target, bias: ir.Value) -> bool:
    shape = bias.const_value.shape
    channels = target.weight.const_value.shape[target.axis]
    if len(shape) != 1 or shape[0] != channels:
        return False
    return target.kind != "gemm" or target.node.attributes.get_float("beta", 1.0) == 1.0


def _quantize_bias(graph: ir.Graph, node: ir.Node, bias: ir.Value, b: np.ndarray, scale: np.ndarray) -> int:
    """Replace ``bias`` by DequantizeLinear(int32 codes of ``b``, input_scale * weight_scale); returns its bytes."""
    scale = np.broadcast_to(np.asarray(scale, np.float32), b.shape).astype(np.float32)
    codes = np.clip(np.round(b / scale.astype(np.float64)), -(2**31), 2**31 - 1).astype(np.int32)
    qv = add_initializer(graph, f"{bias.name}_quantized", codes)
    sv = add_initializer(graph, f"{bias.name}_scale", scale)
    dq = ir.Node("", "DequantizeLinear", [qv, sv], [ir.AttrInt64("axis", 0)],
                 name=unique_node_name(graph, f"{bias.name}_dequantize"), num_outputs=1)
    dq.outputs[0].name = unique_name(graph, f"{bias.name}_dequantized")
    dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    dq.outputs[0].shape = ir.Shape(b.shape)
    graph.insert_before(node, dq)
    for use in list(bias.uses()):
        if use.node is node:
            node.replace_input_with(use.idx, dq.outputs[0])
    if not list(bias.uses()):
        graph.initializers.pop(bias.name, None)
    return codes.nbytes + scale.nbytes


def _first_use(graph: ir.Graph, value: ir.Value) -> ir.Node:
    return min((u.node for u in value.uses()), key=_position(graph))

