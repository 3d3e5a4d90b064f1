"""eliminate-dead: remove nodes, initializers and functions nothing uses.

A node is dead when none of its outputs is used (by any node, including
nodes in subgraphs) or is a graph output. Each graph is walked in reverse
order, so a dead chain goes in one run; a live node's subgraphs are swept
when the walk reaches it, which frees outer values only they used before
the walk gets to those values' producers. A removed node's subgraph nodes
drop their uses of outer values too.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import onnx_ir as ir

from compiler.passes import Pass, PassResult, register
from passes.cleanup import _graphs


@register
@dataclasses.dataclass(frozen=True)
class EliminateDead(Pass):
    """Dead-code elimination over the graph, its subgraphs and model functions."""

    name: ClassVar[str] = "eliminate-dead"
    summary: ClassVar[str] = "remove unused nodes, initializers and model-local functions"

    def call(self, model: ir.Model) -> PassResult:
        removed = _sweep(model.graph)
        removed += _remove_unused_functions(model)
        for function in model.functions.values():
            removed += _sweep(function)
        return PassResult(model, removed > 0)


def _is_dead(node: ir.Node) -> bool:
    return not any(output.uses() or output.is_graph_output() for output in node.outputs)


def _sweep(graph: _graphs.GraphLike) -> int:
    """Remove the dead nodes and initializers of ``graph`` and its subgraphs."""
    dead: list[ir.Node] = []
    removed = 0
    for node in reversed(graph):
        if _is_dead(node):
            _graphs.detach(node)
            dead.append(node)
        else:
            for sub in _graphs.subgraphs(node):
                removed += _sweep(sub)
    if dead:
        graph.remove(dead)
    removed += len(dead)
    if isinstance(graph, ir.Graph):
        unused = [
            name
            for name, value in graph.initializers.items()
            if not value.uses() and not _graphs.is_user_visible(value)
        ]
        for name in unused:
            del graph.initializers[name]
        removed += len(unused)
    return removed


def _remove_unused_functions(model: ir.Model) -> int:
    """Drop model-local functions no node calls, directly or through other functions."""
    if not model.functions:
        return 0
    used: set[ir.OperatorIdentifier] = set()
    pending: list[ir.Graph | ir.Function] = [model.graph]
    while pending:
        graph = pending.pop()
        for node in graph.all_nodes():
            identifier = node.op_identifier()
            if identifier in model.functions and identifier not in used:
                used.add(identifier)
                pending.append(model.functions[identifier])
    unused = [identifier for identifier in model.functions if identifier not in used]
    for identifier in unused:
        del model.functions[identifier]
    return len(unused)
