"""Dependency analysis: which channels of which tensors must be pruned together.

The analysis walks the main graph once, in order, and follows every *channel
axis* that a weighted layer creates (Conv / Gemm / MatMul output channels,
embedding columns) through the ops that read it:

- ops that keep channel ``c`` at index ``c`` (activations, BatchNormalization,
  pooling, residual Add/Mul/Sub, Transpose / Unsqueeze moving the axis) put
  their output in the same *space*: a set of tensors whose channel axes are
  pruned identically (a union-find over values);
- ops that move channels (Concat and Split / Slice on the channel axis,
  Flatten / Reshape into a Gemm, a ShuffleNet channel shuffle, a depthwise
  conv with a channel multiplier, the reshape of a projection into attention
  heads and the GQA key/value repeat) make a new space and record *channel
  edges*: channel ``i`` of one space goes with channel ``j`` of another;
- grouped convolutions add *balance* constraints: each of their groups must
  keep as many channels as the others (the selection enforces them), and a
  channel shuffle couples the same position of every group, so the kept
  channels stay a product (groups x positions) the shuffle's Reshape can hold.

The prunable units are the connected components of the channel-edge graph
(networkx) over every channel of every space; a *group* is a connected set of
spaces (a ResNet stage, a DenseNet block, one attention layer's heads, one
FFN). A space that comes from a graph input, or meets an op whose channel
semantics kiln does not know (LRN, an unreadable reshape) is *blocked*: no
unit touching it is pruned, and the group lists why. A LayerNorm / RMSNorm
over the channel axis or a graph output marks the space *soft* instead: only
hidden-size pruning (``hidden=``) accepts those (the norm then averages over
the kept channels; the output is put back to its size, ``restore.py``); for
every other kind they block.

Weights are recorded as ``Touch``es (this input of this node is sliced along
this axis as that space is); shape constants that spell a channel or head
count, ``group`` attributes, Split sizes and Slice bounds likewise, so the
rewrite (``apply.py``) needs no op knowledge of its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import networkx as nx
import numpy as np
import onnx_ir as ir

from passes.prune.params import find_param, is_float
from passes.prune.shapes import (
    Dim,
    Entry,
    Mono,
    broadcast,
    const_ints,
    monomial,
    product,
    reshape_target,
    resolve_shape,
    value_dims,
)

ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Where", "PRelu", "Equal", "Less", "Greater",
    "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Not", "Mod", "BitShift",
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Softplus",
    "Softsign", "Gelu", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign",
    "Sin", "Cos", "Identity", "Cast", "CastLike", "Dropout", "Clip", "Mish", "ThresholdedRelu", "Shrink", "IsNaN",
    "IsInf",
})
#: com.microsoft ops that are elementwise along the channel axis (their extra inputs broadcast)
CONTRIB_ELEMENTWISE = frozenset({"Gelu", "FastGelu", "BiasGelu", "QuickGelu"})
CONVS = frozenset({"Conv", "FusedConv"})


@dataclasses.dataclass
class Touch:
    """Input ``index`` of ``node`` (a weight) is sliced along ``axis`` as ``space`` is pruned."""

    node: ir.Node
    index: int
    axis: int
    space: int
    #: "out" (a layer's output channels), "in" (a layer's input channels), "dw" (a depthwise
    #: filter), "gamma" (a normalization scale), "scale" (a constant multiplier), "other"
    role: str
    #: > 0: a grouped conv's input channels, ``mod`` per group: channel g * mod + j is column j of the
    #: filters of group g (the output rows g * (Cout / G) ...)
    mod: int = 0


@dataclasses.dataclass
class ShapeTouch:
    """Element ``position`` of the constant shape ``reader`` reads at input ``index`` is the kept count
    of ``space`` (divided by ``div``)."""

    reader: ir.Node
    index: int
    position: int
    space: int
    div: int = 1


@dataclasses.dataclass
class AttrTouch:
    node: ir.Node
    attr: str
    space: int


@dataclasses.dataclass
class SliceTouch:
    """A Slice on the channel axis: its bounds become positions among the kept channels."""

    node: ir.Node
    position: int  # which entry of starts / ends
    space: int  # the input's space
    start: int
    end: int


@dataclasses.dataclass
class SplitTouch:
    node: ir.Node
    spaces: list[int]  # the outputs' spaces


@dataclasses.dataclass
class DimTouch:
    value: ir.Value
    axis: int
    space: int
    div: int = 1


@dataclasses.dataclass
class OutputTouch:
    """A graph output carries ``space`` on ``axis``: pruning that space (the hidden size) puts the output
    back to its declared size, the pruned positions filled with a constant (``apply.restore_output``)."""

    value: ir.Value
    axis: int
    space: int
    #: the LayerNormalization writing the output, whose bias fills the pruned positions (None: zeros)
    norm: ir.Node | None = None


@dataclasses.dataclass
class Balance:
    """The ``blocks`` equal consecutive blocks of ``space`` must keep equally many channels (a grouped conv)."""

    space: int
    blocks: int
    node: str


@dataclasses.dataclass
class Space:
    id: int
    size: int
    kind: str  # "channels" or "heads" (each index a whole head)
    origin: str
    members: list[tuple[ir.Value, int]] = dataclasses.field(default_factory=list)
    blocked: list[str] = dataclasses.field(default_factory=list)
    #: reasons only hidden-size pruning accepts (a norm over the channel axis, a graph output); for every
    #: other kind they block like ``blocked``
    soft: list[str] = dataclasses.field(default_factory=list)
    #: a LayerNorm / RMSNorm normalizes over this channel axis (the residual stream of a transformer)
    normalized: bool = False
    first: bool = False  # written by a layer reading a graph input
    last: bool = False  # written by a layer whose output reaches a graph output (no weighted layer between)


@dataclasses.dataclass
class Unit:
    """Channels that are kept or pruned together: space id -> channel indices."""

    id: int
    channels: dict[int, np.ndarray]

    @property
    def size(self) -> int:
        return sum(len(c) for c in self.channels.values())


@dataclasses.dataclass
class Group:
    id: int
    kind: str  # "channels", "heads" or "ffn"
    spaces: list[int]
    units: list[Unit]
    blocked: list[str]
    layers: list[str]  # names of the layers whose weights it touches
    soft: list[str] = dataclasses.field(default_factory=list)
    normalized: bool = False

    @property
    def channels(self) -> int:
        return sum(u.size for u in self.units)


@dataclasses.dataclass
class Analysis:
    spaces: dict[int, Space]
    groups: list[Group]
    touches: list[Touch]
    shape_touches: list[ShapeTouch]
    attr_touches: list[AttrTouch]
    slice_touches: list[SliceTouch]
    split_touches: list[SplitTouch]
    dim_touches: list[DimTouch]
    balances: list[Balance] = dataclasses.field(default_factory=list)
    output_touches: list[OutputTouch] = dataclasses.field(default_factory=list)


class _Blocked(Exception):
    """Raised inside a rule: the tracked inputs' spaces are blocked with this reason."""


def analyze(model: ir.Model, probed: dict[str, tuple[int, ...]] | None = None) -> Analysis:
    """Find the channel-coupled groups of ``model``'s main graph.

    Shapes should have been inferred; ``probed`` (``shapes.probe_shapes``) fills in
    which unknown dims are 1, so broadcasts over the channel axis can be proven.
    """
    return _Builder(model, probed or {}).run()


class _Builder:
    def __init__(self, model: ir.Model, probed: dict[str, tuple[int, ...]]) -> None:
        self.model = model
        self.probed = probed
        self.graph = model.graph
        self.opset = model.opset_imports.get("", 1)
        self.parent: dict[int, int] = {}
        self.spaces: dict[int, Space] = {}
        self.track: dict[ir.Value, tuple[int, int]] = {}
        self.dims: dict[ir.Value, list[Dim]] = {}
        self.edges: list[tuple[int, np.ndarray, int, np.ndarray]] = []
        self.touches: list[Touch] = []
        self.shape_touches: list[ShapeTouch] = []
        self.attr_touches: list[AttrTouch] = []
        self.slice_touches: list[SliceTouch] = []
        self.split_touches: list[SplitTouch] = []
        self.dim_touches: list[DimTouch] = []
        self.balances: list[Balance] = []
        self.output_touches: list[OutputTouch] = []
        self.skip: set[int] = set()

    # ------------------------------------------------------------------ spaces

    def new_space(self, size: int, kind: str, origin: str) -> int:
        sid = len(self.spaces)
        self.spaces[sid] = Space(sid, int(size), kind, origin)
        self.parent[sid] = sid
        return sid

    def find(self, sid: int) -> int:
        root = sid
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[sid] != root:
            self.parent[sid], sid = root, self.parent[sid]
        return root

    def union(self, a: int, b: int, where: str) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        sa, sb = self.spaces[a], self.spaces[b]
        if sa.size != sb.size:
            reason = f"{where}: combines {sa.size} with {sb.size} channels"
            self.block(a, reason)
            self.block(b, reason)
            return a
        self.parent[b] = a
        sa.members.extend(sb.members)
        sa.blocked.extend(sb.blocked)
        sa.soft.extend(r for r in sb.soft if r not in sa.soft)
        sa.normalized |= sb.normalized
        sa.first |= sb.first
        sa.last |= sb.last
        if sb.kind == "heads":
            sa.kind = "heads"
        return a

    def block(self, sid: int, reason: str) -> None:
        space = self.spaces[self.find(sid)]
        if reason not in space.blocked:
            space.blocked.append(reason)

    def soften(self, sid: int, reason: str, normalized: bool = False) -> None:
        space = self.spaces[self.find(sid)]
        if reason not in space.soft:
            space.soft.append(reason)
        space.normalized |= normalized

    def size(self, sid: int) -> int:
        return self.spaces[self.find(sid)].size

    def set_track(self, value: ir.Value, sid: int, axis: int, dims: list[Dim] | None = None) -> None:
        sid = self.find(sid)
        self.track[value] = (sid, axis)
        self.spaces[sid].members.append((value, axis))
        if dims is None:
            dims = self.dims_of(value)
        if dims is not None and axis < len(dims):
            dims = [f"?{value.name}:{i}" if d is None else d for i, d in enumerate(dims)]
            dims[axis] = self.size(sid)
            self.dims[value] = dims

    def tracked(self, value: ir.Value | None) -> tuple[int, int] | None:
        if value is None or value not in self.track:
            return None
        sid, axis = self.track[value]
        return self.find(sid), axis

    def dims_of(self, value: ir.Value | None) -> list[Dim] | None:
        if value is None:
            return None
        if value in self.dims:
            return self.dims[value]
        if value.const_value is not None:
            return [int(d) for d in value.const_value.shape]
        dims = value_dims(value)
        seen = self.probed.get(value.name or "")
        if dims is None and seen is not None:
            dims = [None] * len(seen)
        if dims is None:
            return None
        if seen is not None and len(seen) == len(dims):
            dims = [1 if s == 1 and not isinstance(d, int) else d for d, s in zip(dims, seen)]
        # an unknown dim becomes a token naming it, so the same dim read elsewhere compares equal
        dims = [f"?{value.name}:{i}" if d is None else d for i, d in enumerate(dims)]
        self.dims[value] = dims
        return dims

    def rank(self, value: ir.Value | None) -> int | None:
        dims = self.dims_of(value)
        return None if dims is None else len(dims)

    def edge(self, a: int, ia: Iterable[int], b: int, ib: Iterable[int]) -> None:
        self.edges.append((a, np.asarray(list(ia), dtype=np.int64), b, np.asarray(list(ib), dtype=np.int64)))

    def couple_within(self, sid: int, sets: Iterable[Sequence[int]]) -> None:
        """Channels of each set in ``sid`` go together."""
        for s in sets:
            s = list(s)
            if len(s) > 1:
                self.edge(sid, [s[0]] * (len(s) - 1), sid, s[1:])

    # ------------------------------------------------------------------ walk

    def run(self) -> Analysis:
        for node in self.graph:
            if id(node) in self.skip:
                continue
            inputs = [(i, self.tracked(v)) for i, v in enumerate(node.inputs)]
            inputs = [(i, t) for i, t in inputs if t is not None]
            try:
                self.visit(node, inputs)
            except _Blocked as why:
                label = f"{node.op_type} {node.name}".strip()
                for _, (sid, _axis) in inputs:
                    self.block(sid, f"{label}: {why}")
        self.finish_checks()
        return self.assemble()

    def visit(self, node: ir.Node, inputs: list[tuple[int, tuple[int, int]]]) -> None:
        op, domain = node.op_type, node.domain
        if domain == "com.microsoft" and op == "FusedConv":
            return self.conv(node, inputs)
        if domain == "com.microsoft" and op in CONTRIB_ELEMENTWISE:
            return self.elementwise(node, inputs) if inputs else None
        if domain not in ("", "ai.onnx"):
            if inputs:
                raise _Blocked(f"{domain} op with unknown channel semantics")
            return None
        if op in CONVS:
            return self.conv(node, inputs)
        if op == "ConvTranspose":
            return self.conv_transpose(node, inputs)
        if op == "Gemm":
            return self.gemm(node, inputs)
        if op == "MatMul":
            return self.matmul(node, inputs)
        if op == "Gather":
            return self.gather(node, inputs)
        if not inputs:
            return None
        if op in ELEMENTWISE:
            return self.elementwise(node, inputs)
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            raise _Blocked("an op with unknown channel semantics")
        return handler(node, inputs)

    def only_output(self, node: ir.Node) -> None:
        """Nodes whose extra outputs (BatchNorm statistics, MaxPool indices, Dropout mask) are used are refused."""
        for out in node.outputs[1:]:
            if out is not None and (list(out.uses()) or out.is_graph_output()):
                raise _Blocked(f"its output {out.name!r} is used")

    # ------------------------------------------------------------------ layers

    def conv(self, node: ir.Node, inputs) -> None:
        x = node.inputs[0]
        w = find_param(node.inputs[1] if len(node.inputs) > 1 else None)
        if w is None or not is_float(w) or len(w.shape) < 3:
            if inputs:
                raise _Blocked("the weight is not a constant")
            return
        group = int(node.attributes["group"].value) if "group" in node.attributes else 1
        cout, k = w.shape[0], w.shape[1]
        t = self.tracked(x)
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        if len(node.inputs) > 3 and node.inputs[3] is not None:  # FusedConv's Z: added to the output
            raise _Blocked("FusedConv with a sum input")
        if t is not None and t[1] != 1:
            raise _Blocked("the channel axis is not axis 1")
        label = node.name or node.op_type
        if t is not None and group > 1 and k == 1:  # depthwise (channel multiplier m)
            sid = t[0]
            m = cout // group
            self.touches.append(Touch(node, 1, 0, sid if m == 1 else -1, "dw"))
            if m == 1:
                if has_bias:
                    self.touches.append(Touch(node, 2, 0, sid, "other"))
                self.attr_touches.append(AttrTouch(node, "group", sid))
                self.set_track(node.outputs[0], sid, 1)
                return
            out = self.new_space(cout, "channels", label)
            self.touches[-1].space = out
            if has_bias:
                self.touches.append(Touch(node, 2, 0, out, "other"))
            self.edge(sid, np.repeat(np.arange(group), m), out, np.arange(cout))
            self.attr_touches.append(AttrTouch(node, "group", sid))
            self.set_track(node.outputs[0], out, 1)
            return
        if t is not None:
            sid = t[0]
            if group == 1:
                self.touches.append(Touch(node, 1, 1, sid, "in"))
            else:
                self.touches.append(Touch(node, 1, 1, sid, "in", mod=k))
                self.balances.append(Balance(sid, group, label))
        out = self.new_space(cout, "channels", label)
        self.touches.append(Touch(node, 1, 0, out, "out"))
        if has_bias:
            self.touches.append(Touch(node, 2, 0, out, "other"))
        if group > 1:
            self.balances.append(Balance(out, group, label))
        if t is None and x is not None and x.is_graph_input():
            self.spaces[out].first = True
        self.set_track(node.outputs[0], out, 1)

    def conv_transpose(self, node: ir.Node, inputs) -> None:
        w = find_param(node.inputs[1])
        group = int(node.attributes["group"].value) if "group" in node.attributes else 1
        if w is None or not is_float(w) or group != 1:
            if inputs:
                raise _Blocked("a grouped or non-constant ConvTranspose")
            return
        t = self.tracked(node.inputs[0])
        if t is not None:
            if t[1] != 1:
                raise _Blocked("the channel axis is not axis 1")
            self.touches.append(Touch(node, 1, 0, t[0], "in"))
        out = self.new_space(w.shape[1], "channels", node.name or "ConvTranspose")
        self.touches.append(Touch(node, 1, 1, out, "out"))
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            self.touches.append(Touch(node, 2, 0, out, "other"))
        if t is None and node.inputs[0].is_graph_input():
            self.spaces[out].first = True
        self.set_track(node.outputs[0], out, 1)

    def gemm(self, node: ir.Node, inputs) -> None:
        attrs = node.attributes
        trans_a = int(attrs["transA"].value) if "transA" in attrs else 0
        trans_b = int(attrs["transB"].value) if "transB" in attrs else 0
        w = find_param(node.inputs[1])
        if w is None or not is_float(w) or len(w.shape) != 2:
            if inputs:
                raise _Blocked("the weight is not a constant")
            return
        t = self.tracked(node.inputs[0])
        if any(i != 0 for i, _ in inputs):
            raise _Blocked("a tracked tensor is not the data input")
        if t is not None:
            if t[1] != (0 if trans_a else 1):
                raise _Blocked("the channel axis is not the contracted axis")
            self.touches.append(Touch(node, 1, 1 if trans_b else 0, t[0], "in"))
        n = w.shape[0] if trans_b else w.shape[1]
        out = self.new_space(n, "channels", node.name or "Gemm")
        self.touches.append(Touch(node, 1, 0 if trans_b else 1, out, "out"))
        c = find_param(node.inputs[2]) if len(node.inputs) > 2 else None
        if c is not None:
            if c.shape and c.shape[-1] == n and (len(c.shape) == 1 or c.shape[0] == 1):
                self.touches.append(Touch(node, 2, len(c.shape) - 1, out, "other"))
            elif c.shape and c.shape[-1] != 1:
                self.block(out, f"Gemm {node.name}: a bias of shape {list(c.shape)}")
        elif len(node.inputs) > 2 and node.inputs[2] is not None:
            self.block(out, f"Gemm {node.name}: the bias is not a constant")
        if t is None and node.inputs[0].is_graph_input():
            self.spaces[out].first = True
        self.set_track(node.outputs[0], out, 1)

    def matmul(self, node: ir.Node, inputs) -> None:
        a, b = node.inputs[0], node.inputs[1]
        w = find_param(b)
        if w is not None and a.const_value is None:
            if not is_float(w) or len(w.shape) != 2:
                if inputs:
                    raise _Blocked("a weight that is not a 2-D float matrix")
                return
            t = self.tracked(a)
            rank = self.rank(a)
            if t is not None:
                if rank is None or t[1] != rank - 1:
                    raise _Blocked("the channel axis is not the contracted (last) axis")
                self.touches.append(Touch(node, 1, 0, t[0], "in"))
            if rank is None:
                return
            out = self.new_space(w.shape[1], "channels", node.name or "MatMul")
            self.touches.append(Touch(node, 1, 1, out, "out"))
            if t is None and a.is_graph_input():
                self.spaces[out].first = True
            dims = self.dims_of(a)
            self.set_track(node.outputs[0], out, max(rank, 2) - 1, None if dims is None else dims[:-1] + [w.shape[1]])
            return
        if not inputs:
            return
        if w is not None or a.const_value is not None:
            raise _Blocked("a constant left operand")
        ra, rb = self.rank(a), self.rank(b)
        if ra is None or rb is None or ra < 2 or rb < 2:
            raise _Blocked("operand ranks unknown")
        r = max(ra, rb)
        placed: list[tuple[int, int]] = []  # (space, output axis)
        for value, rank, which in ((a, ra, "A"), (b, rb, "B")):
            t = self.tracked(value)
            if t is None:
                continue
            sid, axis = t
            if (which == "A" and axis == rank - 1) or (which == "B" and axis == rank - 2):
                raise _Blocked("the channel axis is contracted")
            placed.append((sid, axis + (r - rank)))
        axes = {p for _, p in placed}
        if len(axes) != 1:
            raise _Blocked("two tracked axes in one product")
        p = axes.pop()
        if p < r - 2:  # a batch axis: the other operand must match it or broadcast over it
            for value, rank in ((a, ra), (b, rb)):
                if self.tracked(value) is None:
                    j = p - (r - rank)
                    dims = self.dims_of(value)
                    if j >= 0 and (dims is None or dims[j] != 1):
                        raise _Blocked("a batch axis shared with an untracked tensor")
        elif len(placed) > 1:
            raise _Blocked("two tracked axes in one product")
        sid = placed[0][0]
        for other, _ in placed[1:]:
            sid = self.union(sid, other, f"MatMul {node.name}")
        da, db = self.dims_of(a), self.dims_of(b)
        batch = broadcast([da[:-2], db[:-2]]) if da is not None and db is not None else None
        dims = None if batch is None else batch + [da[-2], db[-1]]
        self.set_track(node.outputs[0], sid, p, dims)

    def gather(self, node: ir.Node, inputs) -> None:
        data, indices = node.inputs[0], node.inputs[1]
        axis = int(node.attributes["axis"].value) if "axis" in node.attributes else 0
        w = find_param(data)
        if w is not None:
            if self.tracked(indices) is not None:
                raise _Blocked("tracked indices")
            irank = self.rank(indices)
            if not is_float(w) or len(w.shape) != 2 or axis != 0 or irank is None:
                return
            out = self.new_space(w.shape[1], "channels", node.name or "Gather")
            self.touches.append(Touch(node, 0, 1, out, "out"))
            self.spaces[out].first = True
            self.set_track(node.outputs[0], out, irank)
            return
        if not inputs:
            return
        t = self.tracked(data)
        rank, irank = self.rank(data), self.rank(indices)
        if t is None or rank is None or irank is None:
            raise _Blocked("tracked indices or unknown ranks")
        axis %= rank
        sid, a = t
        if axis == a:
            raise _Blocked("it gathers along the channel axis")
        self.set_track(node.outputs[0], sid, a if a < axis else a + irank - 1)

    # ------------------------------------------------------------------ channel-preserving ops

    def elementwise(self, node: ir.Node, inputs) -> None:
        self.only_output(node)
        ranks = [self.rank(v) if v is not None else None for v in node.inputs]
        r = max((x for x in ranks if x is not None), default=None)
        if r is None:
            raise _Blocked("operand ranks unknown")
        positions = set()
        for i, (sid, axis) in inputs:
            if ranks[i] is None:
                raise _Blocked("operand ranks unknown")
            positions.add(axis + r - ranks[i])
        if len(positions) != 1:
            raise _Blocked("operands tracked on different axes")
        p = positions.pop()
        sid = inputs[0][1][0]
        label = f"{node.op_type} {node.name}".strip()
        for _, (other, _a) in inputs[1:]:
            sid = self.union(sid, other, label)
        size = self.size(sid)
        tracked_idx = {i for i, _ in inputs}
        for i, value in enumerate(node.inputs):
            if value is None or i in tracked_idx:
                continue
            rank = ranks[i]
            if rank is None:
                raise _Blocked(f"operand {i} has an unknown rank")
            j = p - (r - rank)
            if j < 0:
                continue
            param = find_param(value)
            if param is not None:
                d = param.shape[j]
                if d == 1:
                    continue
                if d == size:
                    role = "scale" if node.op_type == "Mul" or (node.op_type == "Div" and i == 1) else "other"
                    self.touches.append(Touch(node, i, j, sid, role))
                    continue
                raise _Blocked(f"a constant of {d} channels against {size}")
            dims = self.dims_of(value)
            if dims is None or dims[j] != 1:
                raise _Blocked("it mixes the channels with a tensor kiln does not prune")
        shapes = [self.dims_of(v) for v in node.inputs if v is not None]
        self.set_track(node.outputs[0], sid, p, broadcast(shapes))

    def op_BatchNormalization(self, node: ir.Node, inputs) -> None:
        self.only_output(node)
        (i, (sid, axis)), = inputs
        if i != 0 or axis != 1:
            raise _Blocked("the channel axis is not axis 1")
        for index in range(1, 5):
            if find_param(node.inputs[index]) is None:
                raise _Blocked("its parameters are not constants")
            self.touches.append(Touch(node, index, 0, sid, "gamma" if index == 1 else "other"))
        self.set_track(node.outputs[0], sid, 1, self.dims_of(node.inputs[0]))

    def op_InstanceNormalization(self, node: ir.Node, inputs) -> None:
        (i, (sid, axis)), = inputs
        if i != 0 or axis != 1:
            raise _Blocked("the channel axis is not axis 1")
        for index in (1, 2):
            if find_param(node.inputs[index]) is None:
                raise _Blocked("its parameters are not constants")
            self.touches.append(Touch(node, index, 0, sid, "gamma" if index == 1 else "other"))
        self.set_track(node.outputs[0], sid, 1, self.dims_of(node.inputs[0]))

    def _norm_over_last(self, node: ir.Node, inputs) -> None:
        rank = self.rank(node.inputs[0])
        axis = int(node.attributes["axis"].value) if "axis" in node.attributes else -1
        for i, (sid, a) in inputs:
            if i != 0 or rank is None or a > axis % rank:
                raise _Blocked("it normalizes over the channel axis")
            if a == axis % rank:
                if axis % rank != rank - 1:
                    raise _Blocked("it normalizes over the channel axis and others")
                self._norm_params(node, sid)
        self.set_track(node.outputs[0], inputs[0][1][0], inputs[0][1][1], self.dims_of(node.inputs[0]))

    def _norm_params(self, node: ir.Node, sid: int) -> None:
        """A norm over exactly the channel axis: its scale and bias follow the channels; only hidden-size
        pruning accepts that its statistics change."""
        for index in (1, 2):
            value = node.inputs[index] if len(node.inputs) > index else None
            if value is None:
                continue
            param = find_param(value)
            if param is None or len(param.shape) != 1 or param.shape[0] != self.size(sid):
                raise _Blocked("its scale or bias is not a constant vector over the channels")
            self.touches.append(Touch(node, index, 0, sid, "gamma" if index == 1 else "other"))
        self.soften(sid, f"{node.op_type} {node.name}: it normalizes over the channel axis", normalized=True)

    op_LayerNormalization = _norm_over_last
    op_RMSNormalization = _norm_over_last

    def op_LRN(self, node: ir.Node, inputs) -> None:
        raise _Blocked("LRN normalizes across neighbouring channels")

    def op_GroupNormalization(self, node: ir.Node, inputs) -> None:
        raise _Blocked("GroupNormalization ties channels to fixed groups")

    def _pool(self, node: ir.Node, inputs) -> None:
        self.only_output(node)
        (i, (sid, axis)), = inputs
        if axis != 1:
            raise _Blocked("the channel axis is a pooled axis")
        self.set_track(node.outputs[0], sid, 1)

    op_MaxPool = op_AveragePool = op_LpPool = _pool
    op_GlobalAveragePool = op_GlobalMaxPool = op_GlobalLpPool = _pool

    def _softmax(self, node: ir.Node, inputs) -> None:
        (i, (sid, a)), = inputs
        rank = self.rank(node.inputs[0])
        if rank is None:
            raise _Blocked("unknown rank")
        default = -1 if self.opset >= 13 else 1
        axis = (int(node.attributes["axis"].value) if "axis" in node.attributes else default) % rank
        if (self.opset >= 13 and a == axis) or (self.opset < 13 and a >= axis):
            raise _Blocked("it normalizes over the channel axis")
        self.set_track(node.outputs[0], sid, a, self.dims_of(node.inputs[0]))

    op_Softmax = op_LogSoftmax = op_Hardmax = _softmax

    def _reduce(self, node: ir.Node, inputs) -> None:
        (i, (sid, a)), = inputs
        if i != 0:
            raise _Blocked("a tracked axes input")
        rank = self.rank(node.inputs[0])
        if rank is None:
            raise _Blocked("unknown rank")
        axes = self._axes(node, 1)
        keep = int(node.attributes["keepdims"].value) if "keepdims" in node.attributes else 1
        if axes is None:
            raise _Blocked("it reduces over every axis")
        axes = sorted(x % rank for x in axes)
        if not axes:
            noop = int(node.attributes["noop_with_empty_axes"].value) if "noop_with_empty_axes" in node.attributes else 0
            if not noop:
                raise _Blocked("it reduces over every axis")
        if a in axes:
            if node.op_type == "ReduceMean" and axes == [a] and keep and a == rank - 1:
                # the statistic of an RMSNorm / a decomposed LayerNorm: the result has no channel axis
                self.soften(sid, f"ReduceMean {node.name}: it averages over the channel axis", normalized=True)
                return
            raise _Blocked("it reduces over the channel axis")
        self.set_track(node.outputs[0], sid, a if keep else a - sum(1 for x in axes if x < a))

    op_ReduceMean = op_ReduceSum = op_ReduceMax = op_ReduceMin = op_ReduceProd = _reduce
    op_ReduceL1 = op_ReduceL2 = op_ReduceLogSum = op_ReduceLogSumExp = op_ReduceSumSquare = _reduce

    def _axes(self, node: ir.Node, input_index: int) -> list[int] | None:
        if "axes" in node.attributes:
            return [int(x) for x in node.attributes["axes"].value]
        if len(node.inputs) > input_index and node.inputs[input_index] is not None:
            ints = const_ints(node.inputs[input_index])
            if ints is None:
                raise _Blocked("its axes are not constant")
            return ints
        return None

    # ------------------------------------------------------------------ layout ops

    def op_Transpose(self, node: ir.Node, inputs) -> None:
        (i, (sid, a)), = inputs
        rank = self.rank(node.inputs[0])
        if rank is None:
            raise _Blocked("unknown rank")
        perm = [int(x) for x in node.attributes["perm"].value] if "perm" in node.attributes else list(range(rank))[::-1]
        dims = self.dims_of(node.inputs[0])
        self.set_track(node.outputs[0], sid, perm.index(a), [dims[p] for p in perm])

    def op_Unsqueeze(self, node: ir.Node, inputs) -> None:
        (i, (sid, a)), = inputs
        if i != 0:
            raise _Blocked("tracked axes")
        dims = self.dims_of(node.inputs[0])
        axes = self._axes(node, 1)
        if dims is None or axes is None:
            raise _Blocked("unknown rank or axes")
        out_rank = len(dims) + len(axes)
        axes = {x % out_rank for x in axes}
        positions = [p for p in range(out_rank) if p not in axes]
        out = [1] * out_rank
        for src, p in enumerate(positions):
            out[p] = dims[src]
        self.set_track(node.outputs[0], sid, positions[a], out)

    def op_Squeeze(self, node: ir.Node, inputs) -> None:
        (i, (sid, a)), = inputs
        dims = self.dims_of(node.inputs[0])
        if i != 0 or dims is None:
            raise _Blocked("unknown rank")
        axes = self._axes(node, 1)
        if axes is None:
            if any(d is None for d in dims):
                raise _Blocked("squeezes unknown dims")
            axes = [k for k, d in enumerate(dims) if d == 1]
        axes = sorted(x % len(dims) for x in axes)
        if a in axes:
            raise _Blocked("it squeezes the channel axis")
        out = [d for k, d in enumerate(dims) if k not in axes]
        self.set_track(node.outputs[0], sid, a - sum(1 for x in axes if x < a), out)

    def op_Flatten(self, node: ir.Node, inputs) -> None:
        (i, (sid, a)), = inputs
        dims = self.dims_of(node.inputs[0])
        if dims is None:
            raise _Blocked("unknown rank")
        axis = int(node.attributes["axis"].value) if "axis" in node.attributes else 1
        axis %= len(dims) if axis else 1
        if axis > a:
            raise _Blocked("it flattens the channel axis into the leading dim")
        outer, inner = product(dims[axis:a]), product(dims[a + 1 :])
        if outer is None or inner is None:
            raise _Blocked("the flattened dims are not static")
        lead = product(dims[:axis])
        self.merge_axis(node, sid, node.outputs[0], 1, outer, inner, [lead if lead is not None else None, None], None)

    def merge_axis(self, node: ir.Node, sid: int, out: ir.Value, axis: int, outer: int, inner: int,
                   dims: list[Dim] | None, const: Entry | None) -> None:
        """``out`` holds channel c of ``sid`` at positions o * C * inner + c * inner + s along ``axis``."""
        c = self.size(sid)
        if outer == 1 and inner == 1:
            if const is not None and const.const is not None:
                self._shape_touch(node, const, sid)
            self.set_track(out, sid, axis, dims)
            return
        new = self.new_space(outer * c * inner, "channels", node.name or node.op_type)
        index = np.arange(outer * c * inner).reshape(outer, c, inner)
        self.edge(sid, np.broadcast_to(np.arange(c)[None, :, None], index.shape).reshape(-1), new, index.reshape(-1))
        if const is not None and const.const is not None:
            self._shape_touch(node, const, new)
        if dims is not None and axis < len(dims):
            dims = list(dims)
        self.set_track(out, new, axis, dims)

    def _shape_touch(self, node: ir.Node, entry: Entry, sid: int, div: int = 1) -> None:
        """A constant element of a shape tensor that spells a count of ``sid``; found by walking up from node."""
        value, position = entry.const  # type: ignore[misc]
        for user, idx in value.uses():
            if entry.use is not None and (user, idx) != entry.use:
                continue
            if user is node or _feeds(user, node):
                self.shape_touches.append(ShapeTouch(user, idx, position, sid, div))

    def op_Reshape(self, node: ir.Node, inputs) -> None:
        """Channel c at axis a sits at flat offset o * (C * inner) + c * inner + s. The output axis k whose
        trailing dims hold the same C * inner elements keeps it (out[k] == C), merges it with inner dims
        (out[k] a multiple of C) or splits it into out[k] outer blocks (heads, shuffle groups)."""
        (i, (sid, a)), = inputs
        if i != 0:
            raise _Blocked("a tracked shape")
        x = node.inputs[0]
        in_dims = self.dims_of(x)
        entries = resolve_shape(node.inputs[1], self.dims_of, use=(node, 1))
        if in_dims is None or entries is None:
            raise _Blocked("the reshape target is not readable")
        allowzero = bool(node.attributes["allowzero"].value) if "allowzero" in node.attributes else False
        out = reshape_target(in_dims, entries, allowzero)
        c = self.size(sid)
        inner = monomial(in_dims[a + 1 :])
        if out is None or inner is None:
            raise _Blocked("the reshape target is not readable")
        k = _block_axis(out, (c * inner[0], inner[1]))
        if k is None:
            raise _Blocked("it reshapes the channel axis in a way kiln cannot follow")
        d = out[k]
        if not isinstance(d, int):
            raise _Blocked("it reshapes the channel axis into a dim that is not static")
        entry = entries[k] if entries[k].const is not None and entries[k].dim not in (0, -1) else None
        if d == c:
            if entry is not None:
                self._shape_touch(node, entry, sid)
            self.set_track(node.outputs[0], sid, k, out)
            return
        if d > c and d % c == 0:
            self.merge_axis(node, sid, node.outputs[0], k, 1, d // c, out, entry)
            return
        if d < c and c % d == 0:
            if len(out) > k + 1 and out[k + 1] == c // d and self.shuffle(node, sid, a, k, out, entries):
                return
            heads = self.new_space(d, "heads", node.name or "Reshape")
            self.edge(sid, np.arange(c), heads, np.repeat(np.arange(d), c // d))
            if entry is not None:
                self._shape_touch(node, entry, heads)
            self.set_track(node.outputs[0], heads, k, out)
            return
        raise _Blocked("it reshapes the channel axis in a way kiln cannot follow")

    def shuffle(self, node: ir.Node, sid: int, a: int, k: int, out: list[Dim], entries: list[Entry]) -> bool:
        """ShuffleNet's Reshape (C -> G, C/G) -> Transpose (swap) -> Reshape (-> C): a channel permutation."""
        y = node.outputs[0]
        uses = list(y.uses())
        if len(uses) != 1 or y.is_graph_output() or uses[0][0].op_type != "Transpose":
            return False
        transpose = uses[0][0]
        perm = [int(p) for p in transpose.attributes["perm"].value] if "perm" in transpose.attributes else []
        expect = list(range(len(out)))
        expect[k], expect[k + 1] = k + 1, k
        z = transpose.outputs[0]
        zuses = list(z.uses())
        if perm != expect or len(zuses) != 1 or z.is_graph_output() or zuses[0][0].op_type != "Reshape":
            return False
        back = zuses[0][0]
        z_dims = [out[p] for p in perm]
        back_entries = resolve_shape(back.inputs[1], lambda v: z_dims if v is z else self.dims_of(v), use=(back, 1))
        c = self.size(sid)
        if back_entries is None:
            return False
        allowzero = bool(back.attributes["allowzero"].value) if "allowzero" in back.attributes else False
        final = reshape_target(z_dims, back_entries, allowzero)
        rest = monomial(out[k + 2 :])
        if final is None or rest is None or _block_axis(final, (c * rest[0], rest[1])) != k or final[k] != c:
            return False
        groups, m = int(out[k]), c // int(out[k])  # type: ignore[arg-type]
        new = self.new_space(c, "channels", back.name or "shuffle")
        src = np.arange(c)
        self.edge(sid, src, new, (src % m) * groups + src // m)
        self.couple_within(sid, ([g * m + j for g in range(groups)] for j in range(m)))
        if entries[k + 1].const is not None:
            self._shape_touch(node, entries[k + 1], sid, div=groups)
        if back_entries[k].const is not None and back_entries[k].dim not in (0, -1):
            self._shape_touch(back, back_entries[k], new)
        self.dim_touches.append(DimTouch(y, k + 1, sid, groups))
        self.dim_touches.append(DimTouch(z, k, sid, groups))
        self.skip.update({id(transpose), id(back)})
        self.set_track(back.outputs[0], new, k, final)
        return True

    def op_Expand(self, node: ir.Node, inputs) -> None:
        (i, (sid, a)), = inputs
        dims = self.dims_of(node.inputs[0])
        entries = resolve_shape(node.inputs[1], self.dims_of, use=(node, 1))
        if i != 0 or dims is None or entries is None:
            raise _Blocked("the expand target is not readable")
        r = max(len(dims), len(entries))
        p = a + r - len(dims)
        q = p - (r - len(entries))
        if q >= 0:
            e = entries[q]
            if e.dim == 1 or (e.ref is not None and self.tracked(e.ref[0]) is not None
                              and self.tracked(e.ref[0])[1] == e.ref[1]):
                if e.ref is not None:
                    sid = self.union(sid, self.tracked(e.ref[0])[0], f"Expand {node.name}")
            elif e.const is not None and e.dim == self.size(sid):
                self._shape_touch(node, e, sid)
            else:
                raise _Blocked("it expands the channel axis")
        out = broadcast([dims, [e.dim for e in entries]])
        self.set_track(node.outputs[0], sid, p, out)

    def op_Tile(self, node: ir.Node, inputs) -> None:
        (i, (sid, a)), = inputs
        reps = const_ints(node.inputs[1])
        if i != 0 or reps is None or reps[a] != 1:
            raise _Blocked("it tiles the channel axis")
        self.set_track(node.outputs[0], sid, a)

    def op_Concat(self, node: ir.Node, inputs) -> None:
        rank = next((self.rank(v) for v in node.inputs if self.rank(v) is not None), None)
        if rank is None:
            raise _Blocked("unknown rank")
        axis = int(node.attributes["axis"].value) % rank
        axes = {a for _, (_s, a) in inputs}
        if axes == {axis}:
            sizes = []
            for v in node.inputs:
                t = self.tracked(v)
                if t is not None:
                    sizes.append(self.size(t[0]))
                    continue
                dims = self.dims_of(v)
                if dims is None or not isinstance(dims[axis], int):
                    raise _Blocked("an input with an unknown channel count")
                sizes.append(dims[axis])
            out = self.new_space(sum(sizes), "channels", node.name or "Concat")
            offset = 0
            for v, n in zip(node.inputs, sizes):
                t = self.tracked(v)
                if t is None:
                    t = (self.new_space(n, "channels", f"{v.name} (untracked)"), axis)
                    self.block(t[0], f"Concat {node.name}: input {v.name!r} is not prunable")
                self.edge(t[0], np.arange(n), out, offset + np.arange(n))
                offset += n
            dims = self.dims_of(node.inputs[0])
            if dims is not None:
                dims = list(dims)
                dims[axis] = sum(sizes)
            self.set_track(node.outputs[0], out, axis, dims)
            return
        if len(axes) != 1 or axis in axes or len(inputs) != len([v for v in node.inputs if v is not None]):
            raise _Blocked("it concatenates tracked and untracked tensors")
        sid = inputs[0][1][0]
        for _, (other, _a) in inputs[1:]:
            sid = self.union(sid, other, f"Concat {node.name}")
        self.set_track(node.outputs[0], sid, axes.pop())

    def op_Split(self, node: ir.Node, inputs) -> None:
        (i, (sid, a)), = inputs
        rank = self.rank(node.inputs[0])
        if i != 0 or rank is None:
            raise _Blocked("unknown rank")
        axis = (int(node.attributes["axis"].value) if "axis" in node.attributes else 0) % rank
        outs = list(node.outputs)
        dims = self.dims_of(node.inputs[0])
        if axis != a:
            for o in outs:
                self.set_track(o, sid, a, None if dims is None else dims[:axis] + [None] + dims[axis + 1 :])
            return
        c = self.size(sid)
        if "split" in node.attributes:
            sizes = [int(x) for x in node.attributes["split"].value]
        elif len(node.inputs) > 1 and node.inputs[1] is not None:
            sizes = const_ints(node.inputs[1])
            if sizes is None:
                raise _Blocked("its split sizes are not constant")
        else:
            n = len(outs)
            step = -(-c // n)
            sizes = [min(step, c - k * step) for k in range(n)]
        if sum(sizes) != c:
            raise _Blocked("split sizes do not add up")
        spaces, offset = [], 0
        for o, n in zip(outs, sizes):
            new = self.new_space(n, "channels", node.name or "Split")
            self.edge(sid, offset + np.arange(n), new, np.arange(n))
            self.set_track(o, new, a, dims)
            spaces.append(new)
            offset += n
        self.split_touches.append(SplitTouch(node, spaces))

    def op_Slice(self, node: ir.Node, inputs) -> None:
        (i, (sid, a)), = inputs
        rank = self.rank(node.inputs[0])
        if i != 0 or rank is None:
            raise _Blocked("unknown rank or tracked bounds")
        ins = node.inputs
        starts, ends = const_ints(ins[1]), const_ints(ins[2])
        axes = const_ints(ins[3]) if len(ins) > 3 and ins[3] is not None else None
        steps = const_ints(ins[4]) if len(ins) > 4 and ins[4] is not None else None
        if len(ins) > 3 and ins[3] is not None and axes is None:
            raise _Blocked("its axes are not constant")
        if axes is None:
            axes = list(range(len(starts) if starts is not None else 0))
        axes = [x % rank for x in axes]
        dims = self.dims_of(node.inputs[0])
        if a not in axes:
            self.set_track(node.outputs[0], sid, a, [None if k in axes else d for k, d in enumerate(dims or [])] or None)
            return
        pos = axes.index(a)
        if starts is None or ends is None or (steps is not None and steps[pos] != 1):
            raise _Blocked("it slices the channel axis with non-constant bounds or a step")
        c = self.size(sid)
        start, end = _bound(starts[pos], c), _bound(ends[pos], c)
        if end <= start:
            raise _Blocked("an empty slice of the channel axis")
        new = self.new_space(end - start, "channels", node.name or "Slice")
        self.edge(sid, np.arange(start, end), new, np.arange(end - start))
        self.slice_touches.append(SliceTouch(node, pos, sid, start, end))
        self.set_track(node.outputs[0], new, a, dims)

    def op_Pad(self, node: ir.Node, inputs) -> None:
        (i, (sid, a)), = inputs
        rank = self.rank(node.inputs[0])
        if i != 0 or rank is None:
            raise _Blocked("unknown rank or tracked pads")
        pads = [int(x) for x in node.attributes["pads"].value] if "pads" in node.attributes else const_ints(node.inputs[1])
        if pads is None:
            raise _Blocked("its pads are not constant")
        axes = const_ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else list(range(rank))
        axes = [x % rank for x in axes or []]
        if a in axes:
            k = axes.index(a)
            if pads[k] != 0 or pads[k + len(axes)] != 0:
                raise _Blocked("it pads the channel axis")
        self.set_track(node.outputs[0], sid, a)

    def op_Resize(self, node: ir.Node, inputs) -> None:
        (i, (sid, a)), = inputs
        if i != 0:
            raise _Blocked("tracked scales")
        scales = node.inputs[2] if len(node.inputs) > 2 else None
        sizes = node.inputs[3] if len(node.inputs) > 3 else None
        if scales is not None and scales.const_value is not None and scales.const_value.size:
            s = scales.const_value.numpy().reshape(-1)
            if a >= len(s) or float(s[a]) != 1.0:
                raise _Blocked("it scales the channel axis")
        elif sizes is not None and sizes.const_value is not None:
            entries = resolve_shape(sizes, self.dims_of, use=(node, 3))
            if entries is None or entries[a].dim != self.size(sid):
                raise _Blocked("it resizes the channel axis")
            self._shape_touch(node, entries[a], sid)
        else:
            raise _Blocked("its scales are not constant")
        self.set_track(node.outputs[0], sid, a)

    op_Upsample = op_Resize

    def op_Shape(self, node: ir.Node, inputs) -> None:
        return None  # shapes computed at run time follow the pruned model

    op_Size = op_Shape

    # ------------------------------------------------------------------ after the walk

    def finish_checks(self) -> None:
        for value, (sid, axis) in list(self.track.items()):
            if value.is_graph_output():
                self.soften(sid, f"{value.name!r} is a graph output")
                producer = value.producer()
                norm = producer if producer is not None and producer.op_type == "LayerNormalization" else None
                self.output_touches.append(OutputTouch(value, axis, sid, norm))
            for user, _ in value.uses():
                if user.graph is not self.graph:
                    self.block(sid, f"{value.name!r} is read inside a subgraph")
        for value in self.graph.inputs:
            if value in self.track:
                self.block(self.track[value][0], f"{value.name!r} is a graph input")
        # last layers: their output reaches a graph output without another weighted layer
        for t in self.touches:
            if t.role == "out" and _reaches_output(t.node):
                self.spaces[self.find(t.space)].last = True

    def block_conflicts(self) -> None:
        """One weight axis, shape element or attribute that would follow two spaces blocks both."""
        claims: dict[tuple, set[int]] = {}
        for t in self.touches:
            claims.setdefault(("weight", id(t.node), t.index, t.axis), set()).add(t.space)
        for t in self.shape_touches:
            claims.setdefault(("shape", id(t.reader), t.index, t.position), set()).add(t.space)
        for t in self.attr_touches:
            claims.setdefault(("attr", id(t.node), t.attr), set()).add(t.space)
        for key, sids in claims.items():
            if len(sids) > 1:
                for sid in sids:
                    self.block(sid, f"a {key[0]} shared with another channel group")

    def assemble(self) -> Analysis:
        find = self.find
        roots = sorted({find(s) for s in self.spaces})
        spaces = {r: self.spaces[r] for r in roots}
        for t in self.touches:
            t.space = find(t.space)
        for t in self.shape_touches:
            t.space = find(t.space)
        for t in self.attr_touches:
            t.space = find(t.space)
        for t in self.slice_touches:
            t.space = find(t.space)
        for t in self.split_touches:
            t.spaces = [find(s) for s in t.spaces]
        for t in self.dim_touches:
            t.space = find(t.space)
        for b in self.balances:
            b.space = find(b.space)
        for t in self.output_touches:
            t.space = find(t.space)
        self.block_conflicts()

        channel_graph = nx.Graph()
        space_graph = nx.Graph()
        space_graph.add_nodes_from(roots)
        linked: set[int] = set()
        for a, ia, b, ib in self.edges:
            a, b = find(a), find(b)
            channel_graph.add_edges_from(zip(((a, int(x)) for x in ia), ((b, int(y)) for y in ib)))
            space_graph.add_edge(a, b)
            linked.update((a, b))
        for sid in linked:
            channel_graph.add_nodes_from((sid, c) for c in range(spaces[sid].size))

        units: dict[int, list[Unit]] = {}
        counter = 0
        for component in nx.connected_components(channel_graph):
            by_space: dict[int, list[int]] = {}
            for sid, c in component:
                by_space.setdefault(sid, []).append(c)
            unit = Unit(counter, {s: np.sort(np.asarray(v, dtype=np.int64)) for s, v in by_space.items()})
            counter += 1
            units.setdefault(next(iter(by_space)), []).append(unit)
        for sid in roots:
            if sid not in linked:
                units[sid] = []
                for c in range(spaces[sid].size):
                    units[sid].append(Unit(counter, {sid: np.asarray([c], dtype=np.int64)}))
                    counter += 1

        layer_names: dict[int, set[str]] = {}
        for t in self.touches:
            if t.role in ("out", "in", "dw"):
                layer_names.setdefault(t.space, set()).add(t.node.name or t.node.op_type)
        groups = []
        for gid, component in enumerate(nx.connected_components(space_graph)):
            sids = sorted(component)
            group_units = sorted((u for s in sids for u in units.get(s, [])), key=lambda u: _unit_key(u))
            blocked = [r for s in sids for r in spaces[s].blocked]
            layers = sorted({n for s in sids for n in layer_names.get(s, ())})
            kind = "heads" if any(spaces[s].kind == "heads" for s in sids) else "channels"
            soft = list(dict.fromkeys(r for s in sids for r in spaces[s].soft))
            groups.append(Group(gid, kind, sids, group_units, list(dict.fromkeys(blocked)), layers, soft,
                                any(spaces[s].normalized for s in sids)))
        groups.sort(key=lambda g: min(g.spaces))
        for i, g in enumerate(groups):
            g.id = i
        return Analysis(spaces, groups, self.touches, self.shape_touches, self.attr_touches,
                        self.slice_touches, self.split_touches, self.dim_touches, self.balances,
                        self.output_touches)


def _unit_key(unit: Unit) -> tuple[int, int]:
    sid = min(unit.channels)
    return sid, int(unit.channels[sid][0])


def _block_axis(out: list[Dim], block: Mono) -> int | None:
    """The last axis k whose trailing dims hold ``block`` elements (prod(out[k:]) == block), or None."""
    for k in range(len(out) - 1, -1, -1):
        mono = monomial(out[k:])
        if mono is None:
            return None
        if mono == block:
            return k
    return None


def _bound(x: int, size: int) -> int:
    if x < 0:
        x += size
    return min(max(x, 0), size)


def _feeds(user: ir.Node, node: ir.Node, depth: int = 6) -> bool:
    """Whether ``user``'s output reaches ``node`` through a few shape-computing nodes."""
    frontier = [user]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for out in n.outputs:
                for u, _ in out.uses():
                    if u is node:
                        return True
                    nxt.append(u)
        frontier = nxt
        if not frontier:
            return False
    return False


_WEIGHTED = CONVS | {"Gemm", "MatMul", "ConvTranspose"}


def _reaches_output(node: ir.Node, limit: int = 64) -> bool:
    """Whether the output of ``node`` reaches a graph output without passing another weighted layer."""
    seen: set[int] = set()
    frontier = list(node.outputs)
    steps = 0
    while frontier and steps < limit:
        value = frontier.pop()
        steps += 1
        if value.is_graph_output():
            return True
        for user, _ in value.uses():
            if id(user) in seen:
                continue
            seen.add(id(user))
            if user.op_type in _WEIGHTED and find_param(user.inputs[1] if len(user.inputs) > 1 else None) is not None:
                continue
            frontier.extend(user.outputs)
    return False
