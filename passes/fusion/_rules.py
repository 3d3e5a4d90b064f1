"""A small pattern / check / rewrite framework for the fusion passes.

A :class:`Rule` is anchored at one op type. For each node of that type the
runner calls, in order:

- ``match(node, ctx)``: the structural pattern. Return an object describing
  the match, or ``None`` when the node is not this pattern at all (nothing
  is reported then);
- ``check(match, ctx)``: legality. Return ``None`` when the rewrite is legal,
  or a short reason string ("Conv output has another user"); the reason is
  recorded in the :class:`RuleReport` (tests assert on it) and logged;
- ``rewrite(match, ctx)``: edit the graph in place through ``ctx``. It may
  return a node to try the rules on again (a rule anchored at a Conv that
  folded the Mul before it returns the Conv, so the Add before that is tried
  next); otherwise the walk goes on with the next node.

:func:`apply_rules` walks the main graph, the functions and every subgraph
once, in order; a graph's nodes are visited in their (topological) order, so
rules anchored at the *last* node of a chain see the earlier links already
fused. Removed nodes are detached at once and leave the graph in one batch
per graph, so a walk stays linear in the graph size.

Legality conventions the rules share (see ``RewriteContext``):

- an intermediate value that a fusion swallows must have no other user and
  must not be a graph output (``ctx.sole_user``);
- a fused node is placed at the position of the *last* node it replaces, and
  every value it reads was read by one of the replaced nodes; with the
  sole-user rule that cannot create a cycle (a cycle needs a second path
  from an earlier replaced node to a later one, i.e. another user);
- graph outputs keep their names and types (``ctx.forward``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from compiler.passes import Pass, PassResult, paused_gc
from passes.cleanup import _graphs

logger = logging.getLogger("kiln.fusion")

GraphLike = _graphs.GraphLike

#: How many rules may fire in a row on one anchor node before the walk moves on.
MAX_CHAIN = 64

#: Constants larger than this many elements are not read to decide a fusion
#: of the kind "is this operand per-channel" (weights are read regardless).
MAX_OPERAND_ELEMENTS = 1 << 24


# ---------------------------------------------------------------- reports


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A rule matched a node but did not fire: why."""

    rule: str
    node: str
    reason: str


@dataclasses.dataclass
class RuleReport:
    """What one :func:`apply_rules` run did."""

    modified: bool = False
    fired: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    refused: list[Refusal] = dataclasses.field(default_factory=list)

    def reasons(self, rule: str | None = None) -> list[str]:
        """The refusal reasons, optionally of one rule only."""
        return [r.reason for r in self.refused if rule is None or r.rule == rule]

    def fired_rules(self) -> list[str]:
        return [rule for rule, _ in self.fired]

    def count(self, rule: str) -> int:
        return sum(1 for name, _ in self.fired if name == rule)


# ---------------------------------------------------------------- rules


class Rule:
    """One fusion: ``match`` / ``check`` / ``rewrite`` (see the module docstring).

    ``anchors`` are the op types the rule is tried on: ``"Conv"`` for the
    standard domain, ``"com.microsoft::FusedConv"`` for others. Set
    ``needs_shapes`` when ``check`` reads shapes of intermediate values: the
    runner then fills in missing shapes with onnx shape inference for the
    duration of the run (and puts the annotations back afterwards).
    """

    # Class attributes; a parameterized rule may set them per instance.
    name: str = ""
    anchors: tuple[str, ...] = ()
    needs_shapes: bool = False

    def match(self, node: ir.Node, ctx: RewriteContext) -> Any | None:
        raise NotImplementedError

    def check(self, match: Any, ctx: RewriteContext) -> str | None:
        return None

    def rewrite(self, match: Any, ctx: RewriteContext) -> ir.Node | None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<rule {self.name}>"


def _anchor_key(domain: str, op_type: str) -> tuple[str, str]:
    return ("" if domain in _graphs.STANDARD_DOMAINS else domain, op_type)


def _parse_anchor(anchor: str) -> tuple[str, str]:
    domain, sep, op_type = anchor.rpartition("::")
    return _anchor_key(domain if sep else "", op_type)


def node_label(node: ir.Node) -> str:
    return node.name or f"<unnamed {node.op_type}>"


# ---------------------------------------------------------------- context


class _Names:
    """Fresh value and node names, unique across the whole model."""

    def __init__(self, model: ir.Model) -> None:
        self.used: set[str] = set()
        self.counters: dict[str, int] = {}
        graphs: list[GraphLike] = [model.graph, *model.functions.values()]
        for graph in graphs:
            self._collect(graph)

    def _collect(self, graph: GraphLike) -> None:
        used = self.used
        for value in graph.inputs:
            if value.name:
                used.add(value.name)
        if isinstance(graph, ir.Graph):
            used.update(graph.initializers)
        for node in graph.all_nodes():
            if node.name:
                used.add(node.name)
            for value in node.outputs:
                if value.name:
                    used.add(value.name)
            for sub in _graphs.subgraphs(node):
                used.update(v.name for v in sub.inputs if v.name)
                used.update(sub.initializers)

    def free(self, *names: str | None) -> None:
        for name in names:
            if name:
                self.used.discard(name)

    def fresh(self, base: str) -> str:
        base = base or "fused"
        if base not in self.used:
            self.used.add(base)
            return base
        n = self.counters.get(base, 0)
        while True:
            n += 1
            candidate = f"{base}_{n}"
            if candidate not in self.used:
                self.counters[base] = n
                self.used.add(candidate)
                return candidate


class RewriteContext:
    """What a rule sees of the graph it runs in, and the edits it may make."""

    def __init__(
        self, model: ir.Model, graph: GraphLike, names: _Names, report: RuleReport, pins: list
    ) -> None:
        self.model = model
        self.graph = graph
        #: The ir.Graph that nodes of ``graph`` point to (a Function wraps one).
        self.body = graph.graph if isinstance(graph, ir.Function) else graph
        self.names = names
        self.report = report
        self.opset = graph.opset_imports.get("", _graphs.default_opset(model))
        self.as_initializer = _graphs.uses_initializers(model, graph)
        self.dead: list[ir.Node] = []
        self._dead_set: set[ir.Node] = set()
        self._pins = pins

    # ------------------------------------------------------------ reading

    def tensor(self, value: ir.Value | None) -> ir.TensorProtocol | None:
        """The data of a constant value (a non-overridable initializer or a
        Constant node's output); None when not constant."""
        return _graphs.constant_tensor(value)

    def array(self, value: ir.Value | None, *, limit: int | None = None) -> np.ndarray | None:
        """A constant value as a numpy array (None when not constant or larger than ``limit``)."""
        tensor = self.tensor(value)
        if tensor is None:
            return None
        if limit is not None and tensor.size > limit:
            return None
        try:
            return tensor.numpy()
        except Exception:  # noqa: BLE001 - unreadable data: treat as not constant
            return None

    def ints(self, value: ir.Value | None) -> list[int] | None:
        return _graphs.constant_ints(value)

    def producer(self, value: ir.Value | None, *op_types: str) -> ir.Node | None:
        """The standard-domain node of this graph producing ``value`` when its op
        is one of ``op_types`` (producers in an outer scope do not count)."""
        if value is None:
            return None
        node = value.producer()
        if node is None or node.graph is not self.body or node in self._dead_set:
            return None
        if not _graphs.is_standard(node) or (op_types and node.op_type not in op_types):
            return None
        return node

    def is_dead(self, node: ir.Node) -> bool:
        return node in self._dead_set

    # ------------------------------------------------------------ legality

    @staticmethod
    def sole_user(value: ir.Value, node: ir.Node, what: str) -> str | None:
        """A reason when ``value`` is used by anything but ``node`` (or is a graph output)."""
        if value.is_graph_output():
            return f"{what} is a graph output"
        for user, _ in value.uses():
            if user is not node:
                return f"{what} has another user"
        return None

    @staticmethod
    def exclusive_constant(value: ir.Value, node: ir.Node, what: str) -> str | None:
        """A reason when a constant (weight/bias) is read by nodes other than ``node``
        (rewriting it would duplicate it) or carries a quantization record."""
        if _graphs.has_quant_record(value):
            return f"{what} carries a quantization record"
        for user, _ in value.uses():
            if user is not node:
                return f"{what} is shared with another node"
        return None

    @staticmethod
    def forward_problem(old: ir.Value, new: ir.Value) -> str | None:
        """A reason when ``old`` cannot simply be replaced by ``new`` everywhere."""
        if not old.is_graph_output():
            return None
        producer = new.producer()
        if new.is_graph_output():
            return "the replacement value is already a graph output"
        if new.is_graph_input() or new.is_initializer() or producer is None:
            return "a graph output would become a graph input or initializer"
        if producer.graph is not old.graph:
            return "a graph output would come from an outer scope"
        return None

    # ------------------------------------------------------------ editing

    def forward(self, old: ir.Value, new: ir.Value) -> None:
        """Replace every use of ``old`` by ``new``. When ``old`` is a graph output,
        ``new`` takes its place, name and type (check ``forward_problem`` first)."""
        if old.is_graph_output():
            name, type_, shape = old.name, old.type, old.shape
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            old.name = None
            new.name = name
            if type_ is not None:
                new.type = type_
            if shape is not None:
                new.shape = shape
            if old.metadata_props:
                new.metadata_props.update(old.metadata_props)
            self._pins.append((new, new.type, new.shape))
            return
        if new.shape is None and old.shape is not None and not _graphs.is_user_visible(new):
            new.shape = old.shape
        if new.type is None and old.type is not None and not _graphs.is_user_visible(new):
            new.type = old.type
        old.replace_all_uses_with(new)

    def kill(self, *nodes: ir.Node) -> None:
        """Remove nodes whose outputs are no longer used (detached now, removed
        from the graph when the walk of this graph ends)."""
        for node in nodes:
            if node in self._dead_set:
                continue
            for value in node.outputs:
                if value.uses() or value.is_graph_output():
                    raise AssertionError(f"fusion bug: killing {node_label(node)} whose output is used")
            inputs = [v for v in node.inputs if v is not None]
            _graphs.detach(node)
            self._dead_set.add(node)
            self.dead.append(node)
            # The node leaves the graph when this graph's walk ends: its names are free.
            self.names.free(node.name, *(v.name for v in node.outputs))
            for value in inputs:
                self.release(value)

    def kill_if_unused(self, node: ir.Node | None) -> None:
        if node is None or node in self._dead_set or node.graph is not self.body:
            return
        if any(v.uses() or v.is_graph_output() for v in node.outputs):
            return
        if _graphs.has_subgraphs(node) or not _graphs.is_standard(node):
            return
        if node.op_type in _graphs.NON_DETERMINISTIC_OPS:
            return
        self.kill(node)

    def release(self, value: ir.Value | None) -> None:
        """Drop a constant nobody reads any more (an initializer of this graph
        or a Constant node's output), so a fusion leaves no dead weights."""
        if value is None or value.uses() or _graphs.is_user_visible(value):
            return
        producer = value.producer()
        if producer is None:
            owner = value.graph  # the graph holding the initializer (maybe an outer one)
            if (
                isinstance(owner, ir.Graph)
                and value.name is not None
                and owner.initializers.get(value.name) is value
            ):
                owner.initializers.pop(value.name)
                self.names.free(value.name)
            return
        if producer.op_type == "Constant" and _graphs.is_standard(producer):
            self.kill_if_unused(producer)

    def constant(self, array: np.ndarray, name_hint: str, *, before: ir.Node) -> ir.Value:
        """A new constant holding ``array``: an initializer, or a Constant node
        inserted before ``before`` where initializers cannot be used."""
        name = self.names.fresh(name_hint)
        tensor = ir.tensor(np.ascontiguousarray(array), name=name)
        value = ir.Value(
            name=name,
            type=ir.TensorType(tensor.dtype),
            shape=ir.Shape(tensor.shape),
            const_value=tensor if self.as_initializer else None,
        )
        if self.as_initializer:
            assert isinstance(self.graph, ir.Graph)
            self.graph.register_initializer(value)
        else:
            node = ir.Node(
                "",
                "Constant",
                inputs=(),
                attributes=(ir.AttrTensor("value", tensor),),
                outputs=(value,),
                name=self.names.fresh(f"{name}_constant"),
            )
            self.graph.insert_before(before, node)
        return value

    def replace_constant(
        self, node: ir.Node, index: int, array: np.ndarray, *, hint: str | None = None
    ) -> ir.Value:
        """Make input ``index`` of ``node`` a new constant holding ``array``. The old
        input is released first, so a weight rewritten in place keeps its name."""
        old = node.inputs[index] if index < len(node.inputs) else None
        if hint is None:
            hint = old.name if old is not None and old.name else f"{node.name or node.op_type}_{index}"
        if old is not None:
            self.set_input(node, index, None)
        value = self.constant(array, hint, before=node)
        self.set_input(node, index, value)
        return value

    def set_input(self, node: ir.Node, index: int, value: ir.Value | None) -> None:
        """Set input ``index`` (growing the input list when needed); the old
        input is released when nothing reads it any more."""
        if index >= len(node.inputs):
            node.resize_inputs(index + 1)
        old = node.inputs[index]
        node.replace_input_with(index, value)
        if old is not None and old is not value:
            self.release(old)

    def node(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        *,
        attributes: Iterable[ir.Attr] = (),
        before: ir.Node,
        name_hint: str = "",
        domain: str = "",
        num_outputs: int = 1,
        output_names: Sequence[str] | None = None,
    ) -> ir.Node:
        """A new node inserted before ``before``, its name and output names fresh."""
        if output_names is None:
            output_names = [f"{name_hint or op_type}_out"] * num_outputs
        outputs = [ir.Value(name=self.names.fresh(n)) for n in output_names]
        node = ir.Node(
            domain,
            op_type,
            inputs=list(inputs),
            attributes=list(attributes),
            outputs=outputs,
            name=self.names.fresh(name_hint or op_type),
        )
        self.graph.insert_before(before, node)
        return node

    def ensure_opset(self, domain: str, version: int) -> None:
        """Import ``domain`` (at ``version``) in the model and this graph when missing."""
        for opsets in (self.model.opset_imports, self.graph.opset_imports):
            opsets.setdefault(domain, version)


# ---------------------------------------------------------------- running


def apply_rules(model: ir.Model, rules: Sequence[Rule]) -> RuleReport:
    """Run ``rules`` over the model (main graph, functions, subgraphs) once.

    Returns the report: ``modified``, the rules that fired (rule name, anchor
    node) and the refusals (rule, anchor node, reason).
    """
    by_anchor: dict[tuple[str, str], list[Rule]] = {}
    for rule in rules:
        for anchor in rule.anchors:
            by_anchor.setdefault(_parse_anchor(anchor), []).append(rule)
    report = RuleReport()
    if not by_anchor:
        return report
    with paused_gc():
        undo: list = []
        pins: list = []
        if _wants_shapes(model, rules, report):
            from passes.cleanup._shape_inference import infer_missing_shapes

            infer_missing_shapes(model, undo, symbolic=True)
        try:
            names = _Names(model)
            for graph in _graphs.graph_likes(model):
                _apply_to_graph(model, graph, by_anchor, names, report, pins)
        finally:
            if undo:
                from passes.cleanup._shape_inference import restore

                restore(undo)
            for value, type_, shape in pins:
                value.type = type_
                value.shape = shape
    return report


def _wants_shapes(model: ir.Model, rules: Sequence[Rule], report: RuleReport) -> bool:
    """Whether a rule that reads shapes matches somewhere (matching is cheap and
    does not edit), so shape inference runs only when it can matter."""
    by_anchor: dict[tuple[str, str], list[Rule]] = {}
    for rule in rules:
        if rule.needs_shapes:
            for anchor in rule.anchors:
                by_anchor.setdefault(_parse_anchor(anchor), []).append(rule)
    if not by_anchor:
        return False
    for graph in _graphs.graph_likes(model):
        ctx = RewriteContext(model, graph, None, report, [])  # type: ignore[arg-type]
        for node in graph:
            for rule in by_anchor.get(_anchor_key(node.domain, node.op_type), ()):
                try:
                    if rule.match(node, ctx) is not None:
                        return True
                except (ValueError, IndexError, TypeError, KeyError, ArithmeticError):
                    continue
    return False


def _apply_to_graph(
    model: ir.Model,
    graph: GraphLike,
    by_anchor: dict[tuple[str, str], list[Rule]],
    names: _Names,
    report: RuleReport,
    pins: list,
) -> None:
    ctx = RewriteContext(model, graph, names, report, pins)
    body = ctx.body
    seen: set[tuple[str, int, str]] = set()
    for node in list(graph):
        current: ir.Node | None = node
        for _ in range(MAX_CHAIN):
            if current is None or ctx.is_dead(current) or current.graph is not body:
                break
            rules = by_anchor.get(_anchor_key(current.domain, current.op_type))
            if not rules or _graphs.has_ref_attrs(current):
                break
            current = _try_rules(current, rules, ctx, report, seen)
    if ctx.dead:
        graph.remove([n for n in ctx.dead if n.graph is body])


def _try_rules(
    node: ir.Node,
    rules: list[Rule],
    ctx: RewriteContext,
    report: RuleReport,
    seen: set[tuple[str, int, str]],
) -> ir.Node | None:
    """Try each rule on ``node``; after the first that fires, the node to retry (or None)."""
    for rule in rules:
        try:
            match = rule.match(node, ctx)
            reason = None if match is None else rule.check(match, ctx)
        except (ValueError, IndexError, TypeError, KeyError, ArithmeticError) as err:
            match, reason = True, f"cannot analyze the node ({type(err).__name__}: {err})"
        if match is None:
            continue
        if reason is not None:
            key = (rule.name, id(node), reason)
            if key not in seen:
                seen.add(key)
                report.refused.append(Refusal(rule.name, node_label(node), reason))
                logger.debug("%s: not at %s: %s", rule.name, node_label(node), reason)
            continue
        label = node_label(node)
        retry = rule.rewrite(match, ctx)
        report.modified = True
        report.fired.append((rule.name, label))
        logger.debug("%s: fused at %s", rule.name, label)
        return retry
    return None


# ---------------------------------------------------------------- passes


@dataclasses.dataclass(frozen=True)
class RulePass(Pass):
    """A pass that runs a list of rules once (subclasses give ``rules()``)."""

    def rules(self) -> Sequence[Rule]:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, model: ir.Model) -> RuleReport:
        """Run the rules on ``model`` in place; the full report (for tests and tools)."""
        return apply_rules(model, self.rules())

    def call(self, model: ir.Model) -> PassResult:
        return PassResult(model, self.run(model).modified)


# ---------------------------------------------------------------- helpers


def attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.as_int())


def attr_float(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.as_float())


def attr_ints(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return None if attr is None else [int(v) for v in attr.as_ints()]


def attr_string(node: ir.Node, name: str, default: str) -> str:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_string()


def input_at(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def static_dims(value: ir.Value | None) -> list[int] | None:
    """The value's dims when they are all known integers."""
    if value is None or value.shape is None or not value.shape.is_static():
        return None
    return [int(d) for d in value.shape]


def rank_of(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None:
        return None
    return len(value.shape)


def describe_shape(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"


def same_dim(a: Any, b: Any) -> bool:
    """Whether two dims are provably equal (equal ints, or the same named symbol)."""
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    name_a = getattr(a, "value", None)
    return name_a is not None and name_a == getattr(b, "value", None)
