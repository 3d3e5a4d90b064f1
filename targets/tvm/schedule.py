"""kiln's default CPU schedule: every kernel parallel over the cores, vectorized where memory allows.

TVM 0.27 leaves CPU kernels unscheduled unless tuned: one thread, scalar
loops (a small CNN ran 85x slower than onnxruntime). These rules run after
fusion, on each kernel a MetaSchedule database did not already schedule
(``dlight.ApplyDefaultSchedule`` skips those):

1. ``Elementwise``: injective kernels are inlined into their last block, whose
   loops are fused, split into a parallel outer loop and a vector inner one
   (small kernels, up to ``SERIAL_ELEMENTS``, stay on one thread: waking the
   pool costs more than they do).
2. ``TiledReduction``: one reduction block (matmul, convolution, pooling)
   with injective prologue and epilogue blocks. Prologues (layout moves) are
   inlined into it; padding stays a copy, except in convolutions with few taps
   (depthwise, a 3-channel stem), which unroll their taps and read the padding
   in place. When the innermost output axis is contiguous in every buffer that
   uses it, the output is tiled ``rows x vectors*lanes`` with the accumulators
   in registers and the reduction loops inside the tile. The tile shape comes
   from a small cost model of the FMA units (``_tile_shape``: the most FMAs
   per cycle that fit the ISA's registers, dividing the output evenly); a
   tile of rows may span whole image rows (a 7x7 output is tiled 7 rows at a
   time). Column strips are the outer loop when there are many (a strip of
   weights stays in cache across row tiles); the fewest outer tile loops that
   give ``PARALLEL_TASKS`` tasks run in parallel; epilogues (bias,
   activation) are folded into the write-back of each tile.
   A matrix-vector product (one row: a
   decoder's token step) gives each task a strip of up to ``GEMV_STRIP``
   column tiles, accumulated in L1, so each weight row is read in long runs
   (one cache line per row made a 512x4096 int4 matmul 1.8x slower). Otherwise (reductions along the
   contiguous axis, packed quantized weights) the output axes run in parallel
   and the innermost reduction loop is unrolled by ``lanes``.
3. TVM's DLight CPU ``Reduction`` rule for softmax / normalization kernels.
4. ``Fallback``: each block's leading spatial loops fused and run in parallel.

A rule that fails on a kernel leaves it to the next rule (never the compile).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from targets.tvm import _env

#: accumulator tiles: up to MAX_ROWS x (MAX_VECTORS * lanes); a tile's accumulators, its column vectors
#: and the broadcast row value must fit in the ISA's vector registers with one to spare, or LLVM keeps
#: accumulators in memory (AVX2 has 16; AVX-512 and NEON 32)
MAX_ROWS = 16
MAX_VECTORS = 8
#: cycles before an FMA's result feeds the next one (the tile needs this many FMAs in flight per unit)
FMA_LATENCY = 5
#: a matrix-vector product's task spans up to this many column tiles, leaving at least MIN_TASKS tasks
GEMV_STRIP = 8
MIN_TASKS = 4
#: tile loops run in parallel: the fewest outer ones that give this many tasks
PARALLEL_TASKS = 16
#: reductions of at most this many steps (a depthwise convolution's taps) are unrolled, with the padding inlined
UNROLL_TAPS = 49
#: elementwise kernels this small run on one thread
SERIAL_ELEMENTS = 16384


#: the rules in the order the build tries them (the first that schedules a kernel wins)
RULE_ORDER = ("Elementwise", "TiledReduction", "Reduction", "Fallback")


def default_cpu_schedule() -> Any:
    """The ApplyDefaultSchedule pass with kiln's CPU rules."""
    _env.tvm()
    from tvm.s_tir import dlight

    rules = _rule_classes()
    return dlight.ApplyDefaultSchedule(*(rules[name]() for name in RULE_ORDER))


_RULES: dict[str, Any] | None = None


def _rule_classes() -> dict[str, Any]:
    global _RULES
    if _RULES is not None:
        return _RULES
    from tvm import s_tir, tirx
    from tvm.s_tir import dlight
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import ScheduleRule
    from tvm.s_tir.dlight.base.common_schedules import try_inline, try_inline_contiguous_spatial

    def mattr(target: Any) -> set[str]:
        return {str(a) for a in (target.attrs.get("mattr") or [])}

    def lanes(target: Any, bits: int = 32) -> int:
        """Vector lanes from the target's own features (LLVM's answer can reflect this host's CPU)."""
        attrs = mattr(target)
        width = 512 if "+avx512f" in attrs else 256 if attrs & {"+avx", "+avx2"} else 128
        return max(width // bits, 2)

    def registers(target: Any) -> int:
        triple = str(target.attrs.get("mtriple") or "")
        return 32 if "+avx512f" in mattr(target) or triple.startswith(("aarch64", "arm64")) else 16

    def extent(sch: Any, loop: Any) -> int | None:
        value = sch.get(loop).extent
        return int(value.value) if isinstance(value, tirx.IntImm) else None

    def vectorize_inner(sch: Any, block: Any, width: int) -> None:
        loops = sch.get_loops(block)
        if not loops:
            return
        inner = loops[-1]
        n = extent(sch, inner)
        if n is not None and n <= width:
            if n > 1:
                sch.vectorize(inner)
            return
        _, vec = sch.split(inner, factors=[None, width])
        sch.vectorize(vec)

    def parallel_outer(sch: Any, block: Any, count: int) -> Any:
        loops = sch.get_loops(block)[:count]
        if not loops:
            return None
        loop = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        sch.parallel(loop)
        return loop

    class _Safe(ScheduleRule):
        """A CPU rule whose failures mean "not applicable"."""

        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
                return None
            try:
                return self.schedule(func, target)
            except Exception:  # a rule that cannot handle a kernel leaves it to the next one
                return None

        def schedule(self, func: Any, target: Any) -> Any:
            raise NotImplementedError

    class Elementwise(_Safe):
        def schedule(self, func: Any, target: Any) -> Any:
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if not infos or not all(b.is_injective() for b in infos):
                return None
            rest = try_inline(sch, list(infos[:-1]))
            last = infos[-1]
            for info in rest:  # blocks that would not inline: each on its own
                self._one(sch, info.block_rv, target)
            self._one(sch, last.block_rv, target)
            return sch

        @staticmethod
        def _one(sch: Any, block: Any, target: Any) -> None:
            loops = sch.get_loops(block)
            if not loops:
                return
            fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
            width = lanes(target)
            n = extent(sch, fused)
            if n is not None and n <= width:
                return
            outer, vec = sch.split(fused, factors=[None, width])
            sch.vectorize(vec)
            if n is None or n > SERIAL_ELEMENTS:  # waking the thread pool costs more than a small loop
                sch.parallel(outer)

    class TiledReduction(_Safe):
        def schedule(self, func: Any, target: Any) -> Any:
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if not infos:
                return None
            # padding stays its own (parallel) copy when the reduction runs over input channels: inlined,
            # it puts a bounds test on every load of that inner loop (3x3 convolutions ran 1.3-1.8x
            # slower). A convolution with few taps (depthwise, a 3-channel stem) reads each input vector
            # once per tap: there the test costs less than copying the input (dw 3x3 56x56x144: 0.50 ->
            # 0.38 ms; stem: 0.88 -> 0.54 ms)
            few_taps = _few_taps(sch, infos)
            pads = [] if few_taps else [b for b in infos if b.is_injective() and _is_pad(sch, b)]
            infos = try_inline_contiguous_spatial(sch, [b for b in infos if b not in pads])
            reductions = [b for b in infos if not b.is_injective()]
            if len(reductions) != 1:
                return None
            red = reductions[0]
            kind = red.dom_kind()
            ns = len(kind) - len(kind.lstrip("S"))
            if ns == 0 or set(kind[ns:]) != {"R"}:
                return None
            at = infos.index(red)
            prologue, epilogue = infos[:at], infos[at + 1 :]
            if self._contiguous(sch, red.block_rv, ns):
                self._tile(sch, red.block_rv, ns, [b.block_rv for b in epilogue], target, unroll_taps=few_taps)
            else:
                self._rows(sch, red.block_rv, ns, [b.block_rv for b in epilogue], target)
            for info in prologue + pads:
                Elementwise._one(sch, info.block_rv, target)
            return sch

        @staticmethod
        def _contiguous(sch: Any, block: Any, ns: int) -> bool:
            """Whether the innermost output iterator indexes only the last axis of every buffer it touches."""
            stmt = sch.get(block)
            var = stmt.iter_vars[ns - 1].var
            for region in list(stmt.reads) + list(stmt.writes):
                dims = list(region.region)
                for d, rng in enumerate(dims):
                    if _uses(rng.min, var) and d != len(dims) - 1:
                        return False
            return True

        @staticmethod
        def _tile(sch: Any, block: Any, ns: int, epilogue: list, target: Any, *, unroll_taps: bool) -> None:
            loops = sch.get_loops(block)
            s_loops, r_loops = loops[:ns], loops[ns:]
            width = lanes(target)
            # a tile of rows spans the output's leading axes (batch, height, width): part of one image row,
            # or whole image rows (7x7 outputs give tiles of 7 rows, not 7 tiles of 1); the row loops are
            # split, not fused, so addresses need no division
            lead = list(s_loops[:-1])
            extents = [extent(sch, loop) for loop in lead]
            inner = extents[-1] if lead else 1
            n_cols = extent(sch, s_loops[-1])
            rows, cols, strip = _tile_shape(extents, n_cols, width, registers(target))
            vo, vi = sch.split(s_loops[-1], factors=[None, cols * strip])
            vs = None
            if strip > 1:
                vs, vi = sch.split(vi, factors=[strip, cols])
            outer, inner_rows = list(lead), []
            if rows > 1 and (inner is None or inner % rows == 0 or rows < inner):
                wo, wi = sch.split(lead[-1], factors=[None, rows])
                outer, inner_rows = lead[:-1] + [wo], [wi]
            elif rows > 1 and rows == inner:  # one whole image row
                outer, inner_rows = lead[:-1], [lead[-1]]
            elif rows > 1:  # whole image rows: rows // inner of the axis before
                ho, hi = sch.split(lead[-2], factors=[None, rows // inner])
                outer, inner_rows = lead[:-2] + [ho], [hi, lead[-1]]
            # column strips outermost when there are many (the weights are large): a strip of them stays
            # in cache while every row tile reads it
            n_strips = extent(sch, vo)
            order = [vo, *outer] if n_strips is None or n_strips >= PARALLEL_TASKS else [*outer, vo]
            sch.reorder(*order, *r_loops, *([vs] if vs is not None else []), *inner_rows, vi)
            tile = _parallel_prefix(sch, order)
            write_back = sch.cache_write(block, 0, "local")
            for epi in epilogue:
                try:
                    sch.reverse_compute_inline(epi)
                except Exception:
                    Elementwise._one(sch, epi, target)
            sch.reverse_compute_at(write_back, tile, preserve_unit_loops=True)
            for ui in inner_rows:
                sch.unroll(ui)
            vc = None
            if cols > width:
                vc, vi = sch.split(vi, factors=[None, width])
            sch.vectorize(vi)
            if vc is not None:
                sch.unroll(vc)
            if unroll_taps:
                # a depthwise convolution's few taps, unrolled: neighbouring taps of a row of outputs
                # read the same input vectors, which LLVM then loads once
                for loop in r_loops:
                    sch.unroll(loop)
            sch.decompose_reduction(block, r_loops[0])
            vectorize_inner(sch, write_back, width)

        @staticmethod
        def _rows(sch: Any, block: Any, ns: int, epilogue: list, target: Any) -> None:
            loops = sch.get_loops(block)
            width = lanes(target)
            tile = parallel_outer(sch, block, ns)
            inner = loops[-1]
            n = extent(sch, inner)
            if n is None or n > width:
                _, ri = sch.split(inner, factors=[None, width])
                sch.annotate(ri, ann_key="pragma_auto_unroll_max_step", ann_val=width)
                sch.annotate(ri, ann_key="pragma_unroll_explicit", ann_val=1)
            for epi in epilogue:
                try:
                    sch.reverse_compute_at(epi, tile, preserve_unit_loops=True)
                    vectorize_inner(sch, epi, width)
                except Exception:
                    Elementwise._one(sch, epi, target)

    class Fallback(_Safe):
        def schedule(self, func: Any, target: Any) -> Any:
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if not infos:
                return None
            for info in infos:
                kind = info.dom_kind()
                ns = len(kind) - len(kind.lstrip("S"))
                if ns:
                    parallel_outer(sch, info.block_rv, ns)
            return sch

    def _tile_shape(extents: list, n_cols: int | None, width: int, n_registers: int) -> tuple[int, int, int]:
        """(rows, columns, strip) of the accumulator tile: the shape that keeps the FMA units busiest.

        Per step of the reduction a ``r x v``-vector tile does ``r*v`` FMAs (two a cycle), ``r`` broadcasts
        and ``v`` loads (two a cycle), and waits ``FMA_LATENCY`` cycles for each accumulator's previous
        FMA; accumulators, column vectors and the broadcast value must fit in the registers. Tiles divide the
        rows and the columns (a partial tile's predicate scalarizes the loop) when they can. ``extents``
        are the leading output axes' (batch, height, width; None when symbolic): a tile of rows must be
        a box of the output (part of one image row, or whole image rows), since its write-back covers
        the bounding box of what it computed."""
        best, best_key = None, None
        for v in range(1, MAX_VECTORS + 1):
            c = v * width
            if n_cols is not None and n_cols % c and not (n_cols < width and v == 1):
                continue
            for r in range(1, MAX_ROWS + 1):
                if r * v + v + 1 > n_registers - 1 or not _box_rows(r, extents):
                    continue
                cycles = max(r * v / 2, (r + v) / 2, FMA_LATENCY)
                key = (r * v / 2 / cycles, r * v, -(r + v))
                if best_key is None or key > best_key:
                    best, best_key = (r, c), key
        if best is None:  # no whole vector divides the columns: a partial tile
            best = (next(r for r in (4, 2, 1) if _box_rows(r, extents)), width)
        rows, cols = best
        if n_cols is not None and n_cols < cols:
            cols = n_cols
        strip = 1
        if rows == 1 and n_cols is not None and cols * MAX_VECTORS <= n_cols:
            strip = _gemv_strip(n_cols, cols)
        return rows, cols, strip

    def _parallel_prefix(sch: Any, loops: list) -> Any:
        """Run the fewest leading tile loops that give PARALLEL_TASKS tasks in parallel (fused), the rest
        serially inside; returns the innermost tile loop. Fusing every tile loop put a division and a
        modulo on each tile's addresses: a 12544x16x96 matmul ran 2.2x slower, even on one thread."""
        count, n = 1, 0
        while n < len(loops):
            size = extent(sch, loops[n])
            n += 1
            count = PARALLEL_TASKS if size is None else count * size
            if count >= PARALLEL_TASKS:
                break
        head = sch.fuse(*loops[:n]) if n > 1 else loops[0]
        sch.parallel(head)
        return loops[-1] if n < len(loops) else head

    def _box_rows(rows: int, extents: list) -> bool:
        """Whether tiles of ``rows`` output rows are boxes: they divide the last leading axis, or are
        whole multiples of it that divide the axis before."""
        if rows == 1 or not extents:
            return rows == 1
        inner = extents[-1]
        if inner is None:  # symbolic: a partial last tile
            return rows <= 4
        if inner % rows == 0:
            return True
        if rows % inner:
            return False
        if rows == inner:
            return True
        return len(extents) >= 2 and extents[-2] is not None and extents[-2] % (rows // inner) == 0

    def _gemv_strip(n_cols: int, cols: int) -> int:
        """How many column tiles one task of a matrix-vector product accumulates (in L1): rows of the
        weight are then read in long runs instead of one cache line per row (the streaming the hardware
        prefetcher follows), while at least MIN_TASKS tasks are left to run in parallel."""
        n_tiles = n_cols // cols
        for strip in range(min(GEMV_STRIP, n_tiles // MIN_TASKS), 1, -1):
            if n_tiles % strip == 0:
                return strip
        return 1

    def _few_taps(sch: Any, infos: list) -> bool:
        """Whether the kernel's one reduction runs over at most UNROLL_TAPS steps on two or more axes
        (a depthwise convolution's taps, a 3-channel stem; not a matmul's one short axis)."""
        reductions = [b for b in infos if not b.is_injective()]
        if len(reductions) != 1:
            return False
        extents = [iv.dom.extent for iv in sch.get(reductions[0].block_rv).iter_vars if iv.iter_type == 2]
        if not all(isinstance(e, tirx.IntImm) for e in extents):
            return False
        steps = [int(e) for e in extents if int(e) > 1]
        return len(steps) > 1 and int(np.prod(steps)) <= UNROLL_TAPS

    def _is_pad(sch: Any, info: Any) -> bool:
        try:
            return bool(info.is_data_pad(sch))
        except Exception:
            return False

    def _uses(expr: Any, var: Any) -> bool:
        return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr, []))

    class Reduction(dlight.cpu.Reduction):
        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            if not isinstance(func, tirx.PrimFunc) or _reduces_to_scalar(func):
                return None
            try:
                return super().apply(func, target, tunable)
            except Exception:
                return None

    def _reduces_to_scalar(func: Any) -> bool:
        """A kernel whose reductions produce one value (softmax of a [1, N] row): DLight's rule would run
        its elementwise axis in parallel with every reduction inside, recomputed N times."""
        sch = s_tir.Schedule(func)
        try:
            infos = normalize_prim_func(sch) or []
        except Exception:
            return False
        for info in infos:
            if info.is_injective():
                continue
            spatial = [iv.dom.extent for iv in sch.get(info.block_rv).iter_vars if iv.iter_type == 0]
            if all(isinstance(e, tirx.IntImm) and int(e) == 1 for e in spatial):
                return True
        return False

    _RULES = {"Elementwise": Elementwise, "TiledReduction": TiledReduction, "Reduction": Reduction,
              "Fallback": Fallback}
    return _RULES
