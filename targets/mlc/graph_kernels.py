"""Graph packages' int4 matmuls on the LLM path's hand-scheduled kernel.

The TVM backend lowers a ``words``-layout ``QMatMul`` to a TE kernel its
default CPU schedule handles poorly: the weight is read along K, its
contiguous axis, so the schedule can neither vectorize along N nor tile.
``kernels.linear_rows`` reads each weight row once, a group (32 lanes) at a
time, as the LLM decoder does. ``schedule_qmatmuls`` swaps it in for every
such kernel it fits (float32 x and output, groups of 32, K a whole number of
groups); the call sites stay as they are (same parameters, same shapes).
"""

from __future__ import annotations

from typing import Any

from targets.mlc import kernels
from targets.mlc.modes import MODES

_MODE_OF_SCALE = {"float16": MODES["q4f16_1"], "float32": MODES["q4f32_1"]}


def _replacement(func: Any) -> Any:
    from tvm import tirx

    buffers = list(func.params)  # (TVM 0.27: buffer parameters carry their shape and dtype)
    if len(buffers) != 4 or not all(getattr(b, "shape", None) is not None for b in buffers):
        return None
    x, words, scale, out = buffers
    if str(words.dtype) != "uint32" or str(x.dtype) != "float32" or str(out.dtype) != "float32":
        return None
    mode = _MODE_OF_SCALE.get(str(scale.dtype))
    static = [words.shape[0], words.shape[1], scale.shape[1], x.shape[-1], out.shape[-1]]
    if mode is None or not all(isinstance(d, tirx.IntImm) for d in static) or len(x.shape) < 2:
        return None
    n, n_words, groups, k, n_out = (int(d) for d in static)
    if k % mode.group_size or groups * mode.group_size != k or n_words * mode.per_storage != k or n_out != n:
        return None
    if len(out.shape) != len(x.shape):
        return None
    rows = kernels.PREFILL_ROWS if any(not isinstance(d, tirx.IntImm) or int(d) > 1 for d in x.shape[:-1]) else 1
    return kernels.linear_rows(len(x.shape), n, k, mode, rows)


def schedule_qmatmuls(mod: Any) -> tuple[Any, int]:
    """``mod`` with every fitting words-layout QMatMul kernel replaced; returns (module, kernels replaced;
    identical matmuls share one kernel)."""
    from tvm import tirx

    swapped = 0
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tirx.PrimFunc) or not gv.name_hint.startswith("kiln_qmatmul"):
            continue
        new = _replacement(func)
        if new is None:
            continue
        mod.update_func(gv, new.with_attrs({k: v for k, v in func.attrs.items() if k == "global_symbol"})
                        if func.attrs and "global_symbol" in func.attrs else new)
        swapped += 1
    return mod, swapped
