"""Hand-scheduled CPU kernels for the LLM's linear layers (and tied output projection).

``out[m, n] = sum_k x[m, k] * W[n, k]``, W either float ([N, K], the model
dtype) or MLC's q4 storage (``group_quant``), accumulated in float32:

- ``partial[m, n, i] = sum_o x[m, o*L + i] * W[n, o*L + i]`` for ``L`` lanes
  (32: four independent vector accumulators; a q4 group for quantized
  weights, so each group's scale is read once), then
  ``out[m, n] = sum_i partial[m, n, i]``: the weight row is read once,
  contiguously, ``L`` products at a time;
- rows ``n`` are split into chunks that run in parallel; within a chunk,
  ``ROWS_AT_ONCE`` tokens share each weight load (prefill), and their
  ``partial`` accumulators live in registers (computed at the output's loop).

The PrimFunc is scheduled here and marked opaque and scheduled, so Relax's
operator fusion leaves it alone and the default schedule rules skip it.
Decoding reads every weight once per token: this is the loop that decides
tokens per second.
"""

from __future__ import annotations

import functools
from typing import Any

from compiler.errors import UnsupportedError
from targets.mlc import group_quant
from targets.mlc.modes import Mode

#: float32 accumulators per output: four 8-wide vectors, so consecutive FMAs do not wait on each other
LANES = 32
#: output rows per parallel task
ROWS_PER_TASK = 16
#: rows of x (tokens) sharing each weight load in a prefill
PREFILL_ROWS = 4
#: the relax op pattern "opaque" (no fusion across the call)
OPAQUE = 8


@functools.cache
def linear(n: int, k: int, dtype: str, mode: Mode | None, weight_dtype: str | None = None,
           rows_at_once: int = 1) -> Any:
    """The scheduled PrimFunc ``(x [m, k] dtype, weights...) -> [m, n] float32``; ``mode`` None: float weights
    (of ``weight_dtype``, default ``dtype``). ``rows_at_once`` rows of x share each weight load (1 for
    decoding, where the predicate of a partial row block would cost more than it saves)."""
    from tvm import s_tir, te, tirx

    if mode is not None:
        if k % mode.group_size:
            raise UnsupportedError(f"{mode.name}: a linear layer's input size {k} is not a multiple of "
                                   f"the group size {mode.group_size}")
        lanes = mode.group_size  # one group per step: its scale is read once
    else:
        lanes = next(L for L in (LANES, 8, 1) if k % L == 0)
    m = tirx.Var("m", "int64")
    x = te.placeholder((m, k), dtype, name="x")
    if mode is None:
        w = te.placeholder((n, k), weight_dtype or dtype, name="w")
        inputs = [x, w]

        def weight(row: Any, col: Any) -> Any:
            return w[row, col].astype("float32")
    else:
        g = group_quant.groups(k, mode)
        qw = te.placeholder((n, g * mode.group_size // mode.per_storage), mode.storage_dtype, name="q_weight")
        qs = te.placeholder((n, g), mode.model_dtype, name="q_scale")
        inputs = [x, qw, qs]

        def weight(row: Any, col: Any) -> Any:
            code = group_quant._code(qw, row, col, mode).astype("float32")
            return code * qs[row, col // mode.group_size].astype("float32")

    ko = te.reduce_axis((0, k // lanes), name="ko")
    partial = te.compute(
        (m, n, lanes),
        lambda i, j, l: te.sum(x[i, ko * lanes + l].astype("float32") * weight(j, ko * lanes + l), axis=ko),
        name="partial")
    ki = te.reduce_axis((0, lanes), name="ki")
    out = te.compute((m, n), lambda i, j: te.sum(partial[i, j, ki], axis=ki), name="out")
    func = te.create_prim_func([*inputs, out])

    sch = s_tir.Schedule(func)
    p_block, o_block = sch.get_sblock("partial"), sch.get_sblock("out")
    i, j = sch.get_loops(o_block)[:2]
    jo, ji = sch.split(j, [None, ROWS_PER_TASK])
    io, ii = sch.split(i, [None, rows_at_once])
    sch.reorder(jo, ji, io, ii)
    sch.parallel(jo)
    _partial_sums_in_registers(sch, p_block, io, rows_at_once)
    func = sch.mod["main"].without_attr("global_symbol")  # the module names it at each call site
    return func.with_attrs({"tirx.is_scheduled": True, "op_pattern": OPAQUE, "tirx.noalias": True})


@functools.cache
def linear_rows(rank: int, n: int, k: int, mode: Mode, rows_at_once: int = PREFILL_ROWS) -> Any:
    """``linear`` for x of any rank ([d0, ..., k] -> [d0, ..., n] float32, float32 x, q4 weights), for the
    TVM backend's ``words`` QMatMul of ONNX graphs (``graph_kernels``): scheduled as ``linear`` schedules
    its rows, along the last leading dim (the leading dims before it are serial loops inside each task), with
    the weight rows of each task decoded once into a float scratch first."""
    from tvm import s_tir, te, tirx

    lanes = mode.group_size
    lead = [tirx.Var(f"d{i}", "int64") for i in range(rank - 1)]
    x = te.placeholder((*lead, k), "float32", name="x")
    g = group_quant.groups(k, mode)
    qw = te.placeholder((n, g * mode.group_size // mode.per_storage), mode.storage_dtype, name="q_weight")
    qs = te.placeholder((n, g), mode.model_dtype, name="q_scale")

    def decode(row: Any, col: Any) -> Any:
        code = group_quant._code(qw, row, col, mode).astype("float32")
        return code * qs[row, col // mode.group_size].astype("float32")

    # each task decodes its ROWS_PER_TASK weight rows once, for every row of x (graphs run many rows)
    w = te.compute((n, k), decode, name="decoded")
    ko = te.reduce_axis((0, k // lanes), name="ko")
    partial = te.compute(
        (*lead, n, lanes),
        lambda *i: te.sum(x[(*i[:-2], ko * lanes + i[-1])] * w[i[-2], ko * lanes + i[-1]], axis=ko),
        name="partial")
    ki = te.reduce_axis((0, lanes), name="ki")
    out = te.compute((*lead, n), lambda *i: te.sum(partial[(*i, ki)], axis=ki), name="out")
    func = te.create_prim_func([x, qw, qs, out])

    sch = s_tir.Schedule(func)
    p_block, o_block = sch.get_sblock("partial"), sch.get_sblock("out")
    loops = sch.get_loops(o_block)
    outer, i, j = loops[: rank - 2], loops[rank - 2], loops[rank - 1]
    jo, ji = sch.split(j, [None, ROWS_PER_TASK])
    io, ii = sch.split(i, [None, rows_at_once])
    sch.reorder(jo, ji, *outer, io, ii)
    sch.parallel(jo)
    _partial_sums_in_registers(sch, p_block, io, rows_at_once)
    w_block = sch.get_sblock("decoded")
    sch.compute_at(w_block, jo)
    sch.vectorize(sch.split(sch.get_loops(w_block)[-1], [None, mode.per_storage])[-1])
    func = sch.mod["main"].without_attr("global_symbol")
    return func.with_attrs({"tirx.is_scheduled": True, "op_pattern": OPAQUE, "tirx.noalias": True})


def _partial_sums_in_registers(sch, p_block, io, rows_at_once: int) -> None:
    """The lane-wise partial sums computed at ``io``, in local scope: rows x lanes unrolled, so each weight
    value is decoded once for the rows of x and LLVM's SLP vectorizer packs the lanes."""
    sch.compute_at(p_block, io)
    loops = sch.get_loops(p_block)  # (unit loops are not created)
    i_loop, l_loop, ko_loop = loops[-3:] if rows_at_once > 1 else (None, *loops[-2:])
    sch.reorder(*[x for x in (ko_loop, i_loop, l_loop) if x is not None])
    init = sch.decompose_reduction(p_block, ko_loop)
    for loop in sch.get_loops(init)[-2 if rows_at_once > 1 else -1:]:
        sch.unroll(loop)
    if i_loop is not None:
        sch.unroll(i_loop)
    sch.unroll(l_loop)
    sch.set_scope(p_block, 0, "local")
