"""Reconstruction without training: refit the layers after a cut by least squares (``--prune-recover lstsq``).

When a layer loses input channels, the remaining columns of its weight are
refit so that, on the calibration data, its output is as close as possible to
the *original* model's output at the same place:

    W' = argmin || Y_orig - [X_pruned, 1] [W'; b'] ||^2 + damping

``X_pruned`` is the layer's input in the pruned model with every earlier
layer already refit (layers are processed in graph order, so each one also
absorbs the error left upstream); ``Y_orig`` is the original layer output at the
kept output channels. The solve uses the normal equations accumulated batch by
batch in float64, with a small ridge term (``DAMPING`` times the mean diagonal).
Rows are sampled (``MAX_ROWS`` per layer: token rows of a MatMul, output
positions of a Conv, im2col patches), seeded.

Refit: MatMul (a following constant bias Add absorbs the intercept), Gemm
(alpha = beta = 1), Conv with group 1 (2-D, the bias refit too and added
when missing). Other layers are left as pruned and listed as skipped.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from passes.prune.params import Rewriter, find_param

MAX_ROWS = 4096
#: layers whose original outputs are captured together
CHUNK = 8
DAMPING = 1e-3
#: layers with more inputs per output than this (Cin * kh * kw) are not refit (the solve would be too big)
MAX_FEATURES = 6144


@dataclasses.dataclass
class RefitLayer:
    node: str
    kind: str  # "matmul", "gemm" or "conv"
    x: str  # input value name
    y: str  # output value name
    keep_in: np.ndarray  # kept input channels (original indices)
    keep_out: np.ndarray | None  # kept output channels, None = all
    bias_add: str | None = None  # MatMul: the Add node holding the bias
    # filled by refit()
    rows: int = 0
    error_before: float | None = None
    error_after: float | None = None
    skipped: str = ""

    def to_json(self) -> dict:
        out = {"layer": self.node, "rows": self.rows}
        if self.skipped:
            out["skipped"] = self.skipped
        if self.error_before is not None:
            out["relative_error_before"] = round(self.error_before, 6)
            out["relative_error_after"] = round(self.error_after, 6)
        return out


def plan_refits(model: ir.Model, analysis, kept: dict[int, np.ndarray]) -> list[RefitLayer]:
    """The layers whose input channels shrink, in graph order."""
    ins: dict[str, int] = {}
    outs: dict[str, int] = {}
    for t in analysis.touches:
        if t.role == "in" and t.space in kept:
            ins[t.node.name] = t.space
        if t.role == "out":
            outs[t.node.name] = t.space
    layers = []
    for node in model.graph:
        if node.name not in ins:
            continue
        sid = ins[node.name]
        out_sid = outs.get(node.name)
        keep_out = kept.get(out_sid) if out_sid is not None else None
        kind = {"MatMul": "matmul", "Gemm": "gemm", "Conv": "conv"}.get(node.op_type)
        layer = RefitLayer(node.name, kind or node.op_type, node.inputs[0].name, node.outputs[0].name,
                           kept[sid], keep_out)
        if kind is None:
            layer.skipped = f"{node.op_type} is not refit"
        elif kind == "conv" and (_attr(node, "group", 1) != 1 or len(find_param(node.inputs[1]).shape) != 4):
            layer.skipped = "only 2-D convolutions with group 1 are refit"
        elif kind == "gemm" and (_attr(node, "transA", 0) or _attr_f(node, "alpha") != 1.0 or _attr_f(node, "beta") != 1.0):
            layer.skipped = "only Gemm with alpha = beta = 1 and no transA is refit"
        elif kind == "matmul":
            uses = list(node.outputs[0].uses())
            if len(uses) == 1 and uses[0][0].op_type == "Add":
                add = uses[0][0]
                other = add.inputs[1 - uses[0][1]]
                param = find_param(other)
                if param is not None and param.kind == "const" and len(param.shape) == 1:
                    layer.bias_add = add.name
        layers.append(layer)
    return layers


def refit(original: ir.Model, pruned: ir.Model, layers: Sequence[RefitLayer], batches: Sequence[dict],
          progress: Callable[[str], None] | None = None) -> None:
    """Refit each layer of ``layers`` in ``pruned`` (in place) against ``original`` on ``batches``."""
    from passes.quantize.capture import capture, session

    todo = [layer for layer in layers if not layer.skipped]
    nodes = {n.name: n for n in pruned.graph}
    rw = Rewriter(pruned.graph)
    for start in range(0, len(todo), CHUNK):
        chunk = todo[start : start + CHUNK]
        # the original outputs of a few layers at a time (sampled rows only), then each layer in order
        targets: dict[str, list[np.ndarray]] = {layer.y: [] for layer in chunk}
        rows_of: dict[str, list[np.ndarray]] = {layer.y: [] for layer in chunk}
        for b, got in enumerate(capture(original, [layer.y for layer in chunk], batches)):
            for layer in chunk:
                y = got[layer.y]
                sel = _sample(layer, y, b, len(batches))
                rows_of[layer.y].append(sel)
                targets[layer.y].append(_rows_of_output(layer, y, sel))
        for layer in chunk:
            if progress:
                progress(layer.node)
            sess = session(_up_to(pruned, layer.x))
            xs = [sess.run([layer.x], dict(feed))[0] for feed in batches]
            _solve(layer, nodes[layer.node], nodes, rw, xs, targets[layer.y], rows_of[layer.y])


def _up_to(model: ir.Model, name: str) -> bytes:
    """The serialized model cut down to the nodes ``name`` depends on, with ``name`` as its only output
    (onnxruntime runs every node of a graph whatever is fetched)."""
    import onnx

    proto = ir.to_proto(model)
    producer = {out: i for i, node in enumerate(proto.graph.node) for out in node.output}
    keep, todo = set(), [name]
    while todo:
        value = todo.pop()
        i = producer.get(value)
        if i is None or i in keep:
            continue
        keep.add(i)
        node = proto.graph.node[i]
        todo.extend(v for v in node.input if v)
        for attr in node.attribute:  # outer-scope values read by subgraphs
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                todo.extend(v for n in g.node for v in n.input if v)
    nodes = [n for i, n in enumerate(proto.graph.node) if i in keep]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    used = {v for n in nodes for v in n.input}
    inits = [t for t in proto.graph.initializer if t.name in used]
    dropped = {t.name for t in proto.graph.initializer} - used
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(inits)
    inputs = [v for v in proto.graph.input if v.name not in dropped]  # overridable initializers (IR < 4)
    del proto.graph.input[:]
    proto.graph.input.extend(inputs)
    del proto.graph.output[:]
    proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return proto.SerializeToString()


def _attr(node: ir.Node, name: str, default: int) -> int:
    return int(node.attributes[name].value) if name in node.attributes else default


def _attr_f(node: ir.Node, name: str) -> float:
    return float(node.attributes[name].value) if name in node.attributes else 1.0


def _sample(layer: RefitLayer, y: np.ndarray, batch: int, batches: int) -> np.ndarray:
    """Indices of the sampled output rows (positions) of this batch."""
    total = y.size // y.shape[1] if layer.kind == "conv" else y.size // y.shape[-1]
    per = max(1, MAX_ROWS // max(1, batches))
    rng = np.random.default_rng([zlib.crc32(layer.node.encode()), batch])
    if total <= per:
        return np.arange(total)
    return np.sort(rng.choice(total, size=per, replace=False))


def _rows_of_output(layer: RefitLayer, y: np.ndarray, sel: np.ndarray) -> np.ndarray:
    if layer.kind == "conv":
        rows = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    else:
        rows = y.reshape(-1, y.shape[-1])
    rows = rows[sel]
    if layer.keep_out is not None:
        rows = rows[:, layer.keep_out]
    return rows.astype(np.float32)


def _conv_patches(node: ir.Node, x: np.ndarray, sel: np.ndarray, kh: int, kw: int, out_hw: tuple[int, int]) -> np.ndarray:
    strides = [int(v) for v in node.attributes["strides"].value] if "strides" in node.attributes else [1, 1]
    dil = [int(v) for v in node.attributes["dilations"].value] if "dilations" in node.attributes else [1, 1]
    pads = [int(v) for v in node.attributes["pads"].value] if "pads" in node.attributes else [0, 0, 0, 0]
    auto = node.attributes["auto_pad"].value if "auto_pad" in node.attributes else "NOTSET"
    n, c, h, w = x.shape
    oh, ow = out_hw
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        ph = max(0, (oh - 1) * strides[0] + (kh - 1) * dil[0] + 1 - h)
        pw = max(0, (ow - 1) * strides[1] + (kw - 1) * dil[1] + 1 - w)
        top, left = (ph // 2, pw // 2) if auto == "SAME_UPPER" else (ph - ph // 2, pw - pw // 2)
        pads = [top, left, ph - top, pw - left]
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    b, rem = np.divmod(sel, oh * ow)
    oy, ox = np.divmod(rem, ow)
    ky = np.arange(kh) * dil[0]
    kx = np.arange(kw) * dil[1]
    ys = oy[:, None] * strides[0] + ky[None, :]  # [P, kh]
    xs = ox[:, None] * strides[1] + kx[None, :]  # [P, kw]
    patches = xp[b[:, None, None, None], np.arange(c)[None, :, None, None], ys[:, None, :, None], xs[:, None, None, :]]
    return patches.reshape(len(sel), c * kh * kw)


def _solve(layer: RefitLayer, node: ir.Node, nodes: dict[str, ir.Node], rw: Rewriter, xs: list[np.ndarray],
           ys: list[np.ndarray], sels: list[np.ndarray]) -> None:
    weight = find_param(node.inputs[1])
    w = np.asarray(weight.array(), dtype=np.float64)
    if layer.kind == "conv":
        cout, cin, kh, kw = w.shape
        feats = cin * kh * kw
        w2 = w.reshape(cout, feats).T  # [feats, cout]
    elif layer.kind == "gemm" and _attr(node, "transB", 0):
        w2 = w.T
        feats = w2.shape[0]
    else:
        w2 = w
        feats = w2.shape[0]
    if feats > MAX_FEATURES:
        layer.skipped = f"{feats} input features (more than {MAX_FEATURES})"
        return
    intercept = layer.kind in ("conv", "gemm") or layer.bias_add is not None
    d = feats + (1 if intercept else 0)
    gram = np.zeros((d, d))
    cross = np.zeros((d, w2.shape[1]))
    rows = 0
    a_all, y_all = [], []
    for x, y, sel in zip(xs, ys, sels):
        if layer.kind == "conv":
            out_hw = _out_hw(node, x, kh, kw)
            a = _conv_patches(node, x, sel, kh, kw, out_hw).astype(np.float64)
        else:
            a = x.reshape(-1, x.shape[-1])[sel].astype(np.float64)
        if intercept:
            a = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
        y = y.astype(np.float64)
        gram += a.T @ a
        cross += a.T @ y
        rows += a.shape[0]
        a_all.append(a)
        y_all.append(y)
    layer.rows = rows
    old = w2
    if intercept:
        old_bias = _current_bias(layer, node, nodes, w2.shape[1])
        old = np.concatenate([w2, old_bias[None, :]], axis=0)
    damping = DAMPING * float(np.mean(np.diag(gram))) if rows else 0.0
    new = np.linalg.solve(gram + damping * np.eye(d), cross)
    a_cat, y_cat = np.concatenate(a_all), np.concatenate(y_all)
    norm = float(np.linalg.norm(y_cat)) or 1.0
    layer.error_before = float(np.linalg.norm(y_cat - a_cat @ old)) / norm
    layer.error_after = float(np.linalg.norm(y_cat - a_cat @ new)) / norm
    if layer.error_after >= layer.error_before:  # never make a layer worse on its own data
        layer.error_after = layer.error_before
        layer.skipped = "the refit did not reduce the error"
        return
    dtype = weight.dtype.numpy()
    coef = new[:feats]
    if layer.kind == "conv":
        rw.set_const(node, 1, coef.T.reshape(cout, cin, kh, kw).astype(dtype))
    elif layer.kind == "gemm" and _attr(node, "transB", 0):
        rw.set_const(node, 1, coef.T.astype(dtype))
    else:
        rw.set_const(node, 1, coef.astype(dtype))
    if intercept:
        _write_bias(layer, node, nodes, rw, new[feats], dtype)


def _out_hw(node: ir.Node, x: np.ndarray, kh: int, kw: int) -> tuple[int, int]:
    out = node.outputs[0]
    if out.shape is not None and len(out.shape) == 4 and all(isinstance(d, int) for d in out.shape[2:]):
        return int(out.shape[2]), int(out.shape[3])
    strides = [int(v) for v in node.attributes["strides"].value] if "strides" in node.attributes else [1, 1]
    dil = [int(v) for v in node.attributes["dilations"].value] if "dilations" in node.attributes else [1, 1]
    pads = [int(v) for v in node.attributes["pads"].value] if "pads" in node.attributes else [0, 0, 0, 0]
    auto = node.attributes["auto_pad"].value if "auto_pad" in node.attributes else "NOTSET"
    h, w = x.shape[2], x.shape[3]
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return -(-h // strides[0]), -(-w // strides[1])
    oh = (h + pads[0] + pads[2] - (kh - 1) * dil[0] - 1) // strides[0] + 1
    ow = (w + pads[1] + pads[3] - (kw - 1) * dil[1] - 1) // strides[1] + 1
    return oh, ow


def _current_bias(layer: RefitLayer, node: ir.Node, nodes: dict[str, ir.Node], n: int) -> np.ndarray:
    if layer.bias_add is not None:
        add = nodes[layer.bias_add]
        for v in add.inputs:
            p = find_param(v)
            if p is not None:
                return np.asarray(p.array(), np.float64).reshape(-1) * 0.0  # the Add keeps its bias; fit a delta
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        return np.asarray(find_param(node.inputs[2]).array(), np.float64).reshape(-1)
    return np.zeros(n)


def _write_bias(layer: RefitLayer, node: ir.Node, nodes: dict[str, ir.Node], rw: Rewriter, bias: np.ndarray,
                dtype: np.dtype) -> None:
    if layer.bias_add is not None:
        add = nodes[layer.bias_add]
        for i, v in enumerate(add.inputs):
            p = find_param(v)
            if p is not None:
                rw.set_const(add, i, (np.asarray(p.array(), np.float64).reshape(-1) + bias).astype(dtype))
                return
        return
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        rw.set_const(node, 2, bias.astype(dtype))
        return
    value = ir.Value(name=rw.fresh(f"{node.name}_bias"), shape=ir.Shape([len(bias)]),
                     type=ir.TensorType(ir.DataType.FLOAT if dtype == np.float32 else ir.DataType.DOUBLE))
    value.const_value = ir.tensor(bias.astype(dtype), name=value.name)
    rw.graph.register_initializer(value)
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    node.replace_input_with(2, value)
