"""``q0f16`` graph packages: float16 weights stay float16 in the shards, widened inside the library.

kiln's ``fp16`` on a CPU without float16 arithmetic stores each weight in
float16 with a Cast to float32 in front of its readers. The TVM backend's
weight preparation (``LiftTransformParams``) computes everything that depends
on weights alone once, that Cast included, so the prepared params come out
float32. ``narrow`` takes those params back to float16 where that is exact
(every value came from a float16 weight) and makes ``main`` take them as
float16, widening each at its start (``astype``: one kernel per weight and
run, reading half the bytes the float32 param would).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: params smaller than this stay float32 (biases and norms are float32 in kiln's fp16 form)
MIN_ELEMENTS = 256


def exactly_half(array: np.ndarray) -> bool:
    return (array.dtype == np.float32 and array.size >= MIN_ELEMENTS
            and bool(np.array_equal(array.astype(np.float16).astype(np.float32), array, equal_nan=True)))


def narrow(mod: Any, n_inputs: int, values: list[np.ndarray], skip: int = 0) -> tuple[Any, list[np.ndarray], int]:
    """(module, values, how many narrowed): params after the first ``skip`` that are exactly float16 become float16."""
    from tvm import relax

    main = mod["main"]
    params = list(main.params)
    offset = n_inputs
    chosen = [i for i, v in enumerate(values) if i >= skip and exactly_half(v)]
    if not chosen:
        return mod, values, 0
    bindings = []
    new_values = list(values)
    for i in chosen:
        old = params[offset + i]
        half = relax.Var(f"{old.name}_f16", relax.TensorType(list(values[i].shape), "float16"))
        params[offset + i] = half
        bindings.append(relax.VarBinding(old, relax.op.astype(half, "float32")))
        new_values[i] = values[i].astype(np.float16)
    body = main.body
    seq = relax.SeqExpr([relax.BindingBlock(bindings), *body.blocks], body.body)
    func = relax.Function(params, seq, main.ret_ty, main.is_pure, main.attrs)
    mod.update_func(mod.get_global_var("main"), func)
    mod = relax.transform.Normalize()(mod)
    return mod, new_values, len(chosen)
