"""Make the compiled library byte-identical across compiles: one library serves many weight sets.

The one source of variation found (TVM 0.27, x86_64 and aarch64): Relax's
``VMShapeLower`` writes each shape function (``shape_func*``, the host code
that computes symbolic shapes into the VM's shape heap) as a sequence of
``H[slot] = expr`` stores whose order follows a hash map keyed by object
addresses, so it changes from process to process; LLVM then schedules the
stores in that order and the linker's build ID (a hash of the contents)
differs too. ``canonical_shape_funcs`` sorts such sequences by slot, keeping
every store after the stores whose slots it reads.
"""

from __future__ import annotations

from typing import Any

#: PrimExpr fields a heap load can hide under (binary ops, casts, calls, selects, loads' indices)
_CHILDREN = ("a", "b", "value", "args", "indices", "condition", "true_value", "false_value")


def _slot(store: Any) -> int | None:
    from tvm import tirx

    if not isinstance(store, tirx.BufferStore) or len(store.indices) != 1:
        return None
    index = store.indices[0]
    return int(index.value) if isinstance(index, tirx.IntImm) else None


def _reads(expr: Any, buffer: Any, out: set[int]) -> None:
    """Heap slots of ``buffer`` that ``expr`` loads (-1: a load at an unknown index)."""
    from tvm import tirx
    from tvm.ir.expr import TensorLoad

    if isinstance(expr, TensorLoad):  # what tirx.BufferLoad builds
        if not expr.source.same_as(buffer):
            return
        index = expr.indices[0] if len(expr.indices) == 1 else None
        out.add(int(index.value) if isinstance(index, tirx.IntImm) else -1)
        return
    for name in _CHILDREN:
        child = getattr(expr, name, None)
        if child is None or isinstance(child, (int, float, str)):
            continue
        if isinstance(child, tirx.Expr):
            _reads(child, buffer, out)
        elif hasattr(child, "__len__"):
            for item in child:
                if isinstance(item, tirx.Expr):
                    _reads(item, buffer, out)


def _sorted_stores(seq: list[Any]) -> list[Any] | None:
    """``seq`` (heap stores into one buffer at constant slots) in slot order, dependencies first; None if not such."""
    slots = [_slot(s) for s in seq]
    if any(s is None for s in slots) or len({id(s.buffer) for s in seq}) > 1 or len(set(slots)) != len(slots):
        return None
    buffer = seq[0].buffer
    if not all(s.buffer.same_as(buffer) for s in seq):
        return None
    needs: dict[int, set[int]] = {}
    for slot, store in zip(slots, seq):
        reads: set[int] = set()
        _reads(store.value, buffer, reads)
        if -1 in reads:
            return None
        needs[slot] = reads & set(slots)
    by_slot = dict(zip(slots, seq))
    done: set[int] = set()
    out = []
    while len(out) < len(seq):
        ready = [s for s in slots if s not in done and needs[s] <= done]
        if not ready:
            return None  # a cycle: leave the function as TVM wrote it
        first = min(ready)
        done.add(first)
        out.append(by_slot[first])
    return out


def _canonical_body(body: Any) -> Any:
    from tvm import tirx

    if isinstance(body, tirx.SeqStmt):
        ordered = _sorted_stores(list(body.seq))
        if ordered is not None:
            return tirx.SeqStmt(ordered)
    return body


def canonical_shape_funcs() -> Any:
    """A module pass: every ``shape_func*`` PrimFunc's heap stores in canonical order (run after VMShapeLower)."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="KilnCanonicalShapeFuncs")
    def _pass(mod: Any, _ctx: Any) -> Any:
        updates = {}
        for gv, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc) and gv.name_hint.startswith("shape_func"):
                body = _canonical_body(func.body)
                if not body.same_as(func.body):
                    updates[gv] = func.with_body(body)
        for gv, func in updates.items():
            mod.update_func(gv, func)
        return mod

    return _pass
