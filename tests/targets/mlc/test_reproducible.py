"""One library serves many weight sets: the same architecture compiles to the same lib.so bytes."""

from __future__ import annotations

import compiler
from targets.tvm import deterministic
from tests.gguf import tiny


def _lib(art) -> bytes:
    return (art.path / "lib.so").read_bytes()


def test_same_model_twice_gives_the_same_library(llm_package, llama_checkpoint, tmp_path):
    again = compiler.compile(str(llama_checkpoint), emit="mlc", quantize="q0f32", output=tmp_path / "again")
    assert _lib(again) == _lib(llm_package("q0f32"))


def test_other_weights_same_architecture_same_library(llm_package, tmp_path):
    other = tiny.make_llama(tmp_path / "other", seed=7)
    art = compiler.compile(str(other), emit="mlc", quantize="q0f32", output=tmp_path / "pkg")
    ours = llm_package("q0f32")
    assert (art.path / "params_shard_0.bin").read_bytes() != (ours.path / "params_shard_0.bin").read_bytes()
    assert _lib(art) == _lib(ours)


def _shape_func(order: list[int]):
    """A VM shape function storing H[2..5] (H[2] reads H[5], computed in the same function) in ``order``."""
    from tvm import tirx

    heap = tirx.decl_buffer((6,), "int64", name="H")

    def load(i: int):
        return tirx.BufferLoad(heap, [tirx.IntImm("int64", i)])

    values = {2: load(5) + load(1), 3: load(0) * 4, 4: load(0) * 8, 5: load(1) * 2}
    stores = [tirx.BufferStore(heap, values[s], [tirx.IntImm("int64", s)]) for s in order]
    return tirx.PrimFunc([heap], tirx.SeqStmt(stores))


def _store_order(func) -> list[int]:
    return [int(s.indices[0].value) for s in func.body.seq]


def test_shape_function_stores_get_one_order():
    import tvm

    canonical = deterministic.canonical_shape_funcs()
    orders = []
    for order in ([5, 4, 3, 2], [3, 2, 4, 5], [2, 5, 3, 4]):
        mod = tvm.IRModule({"shape_func": _shape_func(order)})
        orders.append(_store_order(canonical(mod)["shape_func"]))
    # slot order, except that slot 2 reads slot 5 and so comes after it
    assert orders == [[3, 4, 5, 2]] * 3
