"""Static reasoning about dims and shape tensors for the dependency analysis.

A dim is an ``int``, a ``str`` (a named symbolic dim such as ``batch``) or
``None`` (unknown). ``resolve_shape`` reads a shape tensor (a Reshape / Expand
/ Resize target) built from constants, ``Shape`` / ``Gather`` / ``Concat`` /
``Unsqueeze`` chains (what exporters write for dynamic shapes) and small
integer arithmetic, and says where each entry comes from: a constant element
(which pruning may have to rewrite) or a dim of another value (which follows
the pruned model by itself).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

Dim = int | str | None
DimsOf = Callable[[ir.Value], list[Dim] | None]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One element of a shape tensor."""

    dim: Dim
    #: (constant value, flat index) when the element is a constant
    const: tuple[ir.Value, int] | None = None
    #: (value, axis) when the element is that value's dim at run time
    ref: tuple[ir.Value, int] | None = None
    #: (node, input index) that reads the constant on the way to the shape (None: not known); one constant
    #: may be read twice for different dims (a kv head count and a repeat count both 2)
    use: tuple[ir.Node, int] | None = None


def value_dims(value: ir.Value) -> list[Dim] | None:
    shape = value.shape
    if shape is None:
        return None
    out: list[Dim] = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
        else:
            name = getattr(d, "value", None)
            out.append(name if isinstance(name, str) and name else None)
    return out


def product(dims: Sequence[Dim]) -> int | None:
    total = 1
    for d in dims:
        if not isinstance(d, int):
            return None
        total *= d
    return total


Mono = tuple[int, tuple[str, ...]]


def monomial(dims: Sequence[Dim]) -> Mono | None:
    """The product of ``dims`` as (integer factor, sorted symbols), or None when a dim is unknown."""
    factor, symbols = 1, []
    for d in dims:
        if d is None:
            return None
        if isinstance(d, int):
            factor *= d
        else:
            symbols.append(d)
    return factor, tuple(sorted(symbols))


def solve_missing(known_in: Sequence[Dim], out: Sequence[Dim], missing: int) -> int | None:
    """The dim at ``out[missing]`` making prod(out) == prod(known_in), symbols cancelling; None if unknowable."""
    num: Counter = Counter()
    ints_in, ints_out = 1, 1
    for d in known_in:
        if d is None:
            return None
        if isinstance(d, int):
            ints_in *= d
        else:
            num[d] += 1
    for i, d in enumerate(out):
        if i == missing:
            continue
        if d is None:
            return None
        if isinstance(d, int):
            ints_out *= d
        else:
            num[d] -= 1
    if any(v != 0 for v in num.values()) or ints_out == 0 or ints_in % ints_out:
        return None
    return ints_in // ints_out


def broadcast(shapes: Sequence[list[Dim] | None]) -> list[Dim] | None:
    """numpy broadcasting of dims; unknown dims yield to known ones other than 1."""
    if any(s is None for s in shapes):
        return None
    rank = max(len(s) for s in shapes)  # type: ignore[arg-type]
    out: list[Dim] = []
    for i in range(rank):
        picked: Dim = 1
        for s in shapes:
            j = i - (rank - len(s))  # type: ignore[arg-type]
            if j < 0:
                continue
            d = s[j]  # type: ignore[index]
            if d == 1:
                continue
            if picked == 1 or picked is None:
                picked = d
        out.append(picked)
    return out


def const_ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    array = value.const_value.numpy()
    if array.dtype.kind not in "iu":
        return None
    return [int(x) for x in array.reshape(-1)]


def resolve_shape(value: ir.Value | None, dims_of: DimsOf, depth: int = 0,
                  use: tuple[ir.Node, int] | None = None) -> list[Entry] | None:
    """The entries of the 1-D integer tensor ``value`` (read by input ``use`` = (node, index)), or None when
    it cannot be read."""
    if value is None or depth > 16:
        return None
    if value.const_value is not None:
        ints = const_ints(value)
        return None if ints is None else [Entry(x, const=(value, i), use=use) for i, x in enumerate(ints)]
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type

    def sub(i: int) -> list[Entry] | None:
        return resolve_shape(node.inputs[i] if i < len(node.inputs) else None, dims_of, depth + 1, (node, i))

    if op == "Shape":
        source = node.inputs[0]
        dims = dims_of(source)
        if dims is None:
            return None
        rank = len(dims)
        start = _attr_int(node, "start", 0)
        end = _attr_int(node, "end", rank)
        start, end = _clamp(start, rank), _clamp(end, rank)
        return [Entry(dims[a], ref=(source, a)) for a in range(start, end)]
    if op in ("Unsqueeze", "Squeeze", "Cast", "Identity") or (op == "Reshape" and const_ints(node.inputs[1]) == [-1]):
        return sub(0)
    if op == "Concat":
        out: list[Entry] = []
        for i in range(len(node.inputs)):
            part = sub(i)
            if part is None:
                return None
            out.extend(part)
        return out
    if op == "Gather":
        data = sub(0)
        index = node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if data is None or index is None:
            return None
        picks = np.asarray(index.numpy()).reshape(-1)
        try:
            return [data[int(i)] for i in picks]
        except IndexError:
            return None
    if op == "Slice":
        data = sub(0)
        bounds = [const_ints(node.inputs[i]) if i < len(node.inputs) and node.inputs[i] is not None else None
                  for i in (1, 2, 3, 4)]
        if data is None or bounds[0] is None or bounds[1] is None or len(bounds[0]) != 1:
            return None
        if (bounds[2] is not None and bounds[2] not in ([0], [-1])):
            return None
        step = bounds[3][0] if bounds[3] is not None else 1
        return data[slice(bounds[0][0], bounds[1][0], step)] if step else None
    if op in ("Mul", "Add", "Sub", "Div"):
        a, b = sub(0), sub(1)
        if a is None or b is None:
            return None
        if len(a) != len(b):
            if len(a) == 1:
                a = a * len(b)
            elif len(b) == 1:
                b = b * len(a)
            else:
                return None
        return [Entry(_arith(op, x.dim, y.dim)) for x, y in zip(a, b)]
    if op == "Where":
        cond, ones, x = (list(node.inputs) + [None, None, None])[:3]
        if cond is not None and cond.const_value is not None:  # a folded condition: pick per element
            mask = np.asarray(cond.const_value.numpy()).reshape(-1)
            a, b = sub(1), sub(2)
            if a is None or b is None:
                return None
            n = max(len(mask), len(a), len(b))
            if any(len(part) not in (1, n) for part in (mask, a, b)):
                return None
            pick = lambda part, i: part[i if len(part) > 1 else 0]  # noqa: E731
            return [pick(a, i) if bool(pick(mask, i)) else pick(b, i) for i in range(n)]
        # Where(Equal(X, -1...), 1..., X): exporters' "-1 means keep" for Expand targets
        eq = cond.producer() if cond is not None else None
        if eq is None or eq.op_type != "Equal" or x is None or eq.inputs[0] is not x:
            return None
        minus, one = const_ints(eq.inputs[1]), const_ints(ones)
        entries = sub(2)
        if entries is None or minus is None or one is None or set(minus) != {-1} or set(one) != {1}:
            return None
        return [Entry(1) if e.dim == -1 else e for e in entries]
    return None


def _arith(op: str, a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        if op == "Mul":
            return a * b
        if op == "Add":
            return a + b
        if op == "Sub":
            return a - b
        return a // b if b else None
    return None


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.value)


def _clamp(axis: int, rank: int) -> int:
    if axis < 0:
        axis += rank
    return min(max(axis, 0), rank)


def reshape_target(in_dims: list[Dim], entries: list[Entry], allowzero: bool) -> list[Dim] | None:
    """The output dims of Reshape(input with ``in_dims``, ``entries``), resolving 0 and -1 where possible."""
    out: list[Dim] = []
    missing = None
    for i, e in enumerate(entries):
        d = e.dim
        if d == 0 and not allowzero:
            if i >= len(in_dims):
                return None
            d = in_dims[i]
        elif d == -1:
            missing = i
        elif isinstance(d, int) and d < -1:
            return None
        out.append(d)
    if missing is not None:
        out[missing] = solve_missing(in_dims, out, missing)
    return out


#: distinct sizes given to symbolic input dims in a probe run (none is 1, so a 1 seen is a real 1)
PROBE_SIZES = (11, 13, 17, 19, 23, 29, 31, 37)


def probe_shapes(model: ir.Model) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of the main-graph values whose inferred shape is incomplete, from one
    onnxruntime run on seeded inputs (symbolic dims get distinct sizes > 1); {} when it cannot run."""
    import onnx

    from passes.quantize.capture import session, with_outputs

    wanted = []
    for node in model.graph:
        for out in node.outputs:
            dims = value_dims(out)
            if out.name and (dims is None or any(d is None or isinstance(d, str) for d in dims)):
                wanted.append(out.name)
    if not wanted:
        return {}
    sizes: dict[object, int] = {}
    feeds = {}
    rng = np.random.default_rng(0)
    initializers = set(model.graph.initializers)
    try:
        for value in model.graph.inputs:
            if value.name in initializers:
                continue
            dims = value_dims(value) or []
            shape = []
            for i, d in enumerate(dims):
                if isinstance(d, int):
                    shape.append(d)
                else:
                    key = d if d is not None else (value.name, i)
                    if key not in sizes:
                        sizes[key] = PROBE_SIZES[len(sizes) % len(PROBE_SIZES)]
                    shape.append(sizes[key])
            dtype = value.dtype.numpy() if value.dtype is not None else np.float32
            if np.dtype(dtype).kind in "iu":
                feeds[value.name] = rng.integers(0, 2, size=shape).astype(dtype)
            elif np.dtype(dtype).kind == "b":
                feeds[value.name] = np.ones(shape, dtype=bool)
            else:
                feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        sess = session(with_outputs(model, wanted), optimize=False)
        names = [o.name for o in sess.get_outputs()]
        results = sess.run(names, feeds)
    except Exception:  # noqa: BLE001 - a probe is best effort; unknown dims stay unknown
        return {}
    del onnx
    return {n: tuple(int(d) for d in np.shape(r)) for n, r in zip(names, results)}
