"""The IR verifier, run after every pass.

Checks, in one linear walk over the model (subgraphs and functions included):
every node input is a graph input, an initializer, an outer-scope value or an
output of an earlier node (so the order is topological); use lists agree with
node inputs; value names are unique within a graph; initializers hold data and
are not produced by nodes; the main graph's inputs and outputs are typed.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir

from compiler.errors import VerificationError

MAX_REPORTED = 10


def find_problems(model: ir.Model) -> list[str]:
    """Every invariant the model breaks, as readable lines (empty when valid)."""
    problems: list[str] = []
    graph = model.graph
    for kind, values in (("input", graph.inputs), ("output", graph.outputs)):
        for value in values:
            if value.type is None:
                problems.append(f"graph {kind} {value.name!r} has no type")
    _check_graph(graph, [], problems)
    for function in model.functions.values():
        scope = set(function.inputs)
        _check_nodes(function, function.outputs, [scope], problems, f"function {function.name!r}")
    return problems


def verify_model(model: ir.Model) -> None:
    """Raise VerificationError listing the first problems when the model is invalid."""
    problems = find_problems(model)
    if problems:
        shown = "; ".join(problems[:MAX_REPORTED])
        more = f" (and {len(problems) - MAX_REPORTED} more)" if len(problems) > MAX_REPORTED else ""
        raise VerificationError(f"{len(problems)} IR problem(s): {shown}{more}")


def _check_graph(graph: ir.Graph, outer: list[set[ir.Value]], problems: list[str]) -> None:
    where = f"graph {graph.name!r}" if graph.name else "graph"
    scope: set[ir.Value] = set(graph.inputs)
    for name, value in graph.initializers.items():
        if value.const_value is None:
            problems.append(f"initializer {name!r} in {where} has no data")
        if value.producer() is not None:
            problems.append(f"initializer {name!r} in {where} is also produced by a node")
        scope.add(value)
    names: dict[str, ir.Value] = {}
    for value in scope:
        _claim_name(value, names, problems, where)
    _check_nodes(graph, graph.outputs, [*outer, scope], problems, where, names)


def _check_nodes(
    nodes: Iterable[ir.Node],
    outputs: Iterable[ir.Value],
    scopes: list[set[ir.Value]],
    problems: list[str],
    where: str,
    names: dict[str, ir.Value] | None = None,
) -> None:
    names = {} if names is None else names
    local = scopes[-1]
    refs: dict[ir.Value, int] = {}
    for node in nodes:
        label = _node_label(node)
        for index, value in enumerate(node.inputs):
            if value is None:
                continue
            if not _defined(value, scopes):
                problems.append(
                    f"input {value.name!r} of {label} in {where} is not defined before use"
                )
            refs[value] = refs.get(value, 0) + 1
        for attr in node.attributes.values():
            if attr.is_ref():
                continue
            if attr.type == ir.AttributeType.GRAPH:
                _check_graph(attr.value, scopes, problems)
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.value:
                    _check_graph(sub, scopes, problems)
        for index, value in enumerate(node.outputs):
            if value.producer() is not node or value.index() != index:
                problems.append(f"output {index} of {label} in {where} does not point back to it")
            local.add(value)
            _claim_name(value, names, problems, where)
    for value in outputs:
        if not _defined(value, scopes):
            problems.append(f"output {value.name!r} of {where} is not produced")
    for value, count in refs.items():
        _check_uses(value, count, problems)


def _check_uses(value: ir.Value, count: int, problems: list[str]) -> None:
    # Each (node, index) in the use list must point back at the value; the
    # count of this scope's references is at most the use-list length (uses
    # from other scopes are counted in their own walk).
    uses = value.uses()
    for use in uses:
        node, index = use
        if node.graph is None or index >= len(node.inputs) or node.inputs[index] is not value:
            problems.append(f"use list of {value.name!r} has a stale entry ({node.op_type} input {index})")
    if count > len(uses):
        problems.append(f"use list of {value.name!r} misses {count - len(uses)} use(s)")


def _defined(value: ir.Value, scopes: list[set[ir.Value]]) -> bool:
    return any(value in scope for scope in reversed(scopes))


def _claim_name(value: ir.Value, names: dict[str, ir.Value], problems: list[str], where: str) -> None:
    if not value.name:
        return
    other = names.setdefault(value.name, value)
    if other is not value:
        problems.append(f"two values are named {value.name!r} in {where}")


def _node_label(node: ir.Node) -> str:
    op = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
    return f"node {node.name!r} ({op})" if node.name else f"an unnamed {op} node"
