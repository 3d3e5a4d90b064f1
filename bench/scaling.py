"""-O1 cost per node on synthetic graphs of 2,000 and 20,000 nodes: is it linear?

Each block of the graph gives every -O1 pass work: an Identity, a constant
sub-expression, a duplicated Add/Relu pair (CSE), a Shape→Gather→Concat→Reshape
chain on static shapes (shape folding) and a dead Neg. Prints a table of
import / -O1 / export times and -O1 time per node, and the per-node ratio of
the large graph to the small one (linear cost: ratio ≤ 1.5).

Run: python bench/scaling.py [--sizes 2000 20000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compiler.importers.onnx_file import import_onnx  # noqa: E402
from compiler.passes import PassManager, opt_level_pipeline  # noqa: E402

WIDTH = 16
NODES_PER_BLOCK = 14


def build(n_nodes: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "idx0"))
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "minus1"))
    h = "x"
    blocks = n_nodes // NODES_PER_BLOCK
    for i in range(blocks):
        p = f"b{i}_"
        inits.append(numpy_helper.from_array((rng.standard_normal((WIDTH, WIDTH)) * 0.1).astype(np.float32), p + "w"))
        inits.append(numpy_helper.from_array(rng.standard_normal(WIDTH).astype(np.float32), p + "k1"))
        inits.append(numpy_helper.from_array(rng.standard_normal(WIDTH).astype(np.float32), p + "k2"))
        nodes += [
            helper.make_node("Identity", [h], [p + "a"]),
            helper.make_node("Add", [p + "k1", p + "k2"], [p + "c"]),
            helper.make_node("Mul", [p + "c", p + "k1"], [p + "c2"]),
            helper.make_node("MatMul", [p + "a", p + "w"], [p + "m"]),
            helper.make_node("Add", [p + "m", p + "c2"], [p + "s1"]),
            helper.make_node("Add", [p + "m", p + "c2"], [p + "s2"]),
            helper.make_node("Relu", [p + "s1"], [p + "r1"]),
            helper.make_node("Relu", [p + "s2"], [p + "r2"]),
            helper.make_node("Shape", [p + "r1"], [p + "shape"]),
            helper.make_node("Gather", [p + "shape", "idx0"], [p + "batch"], axis=0),
            helper.make_node("Concat", [p + "batch", "minus1"], [p + "target"], axis=0),
            helper.make_node("Reshape", [p + "r1", p + "target"], [p + "flat"]),
            helper.make_node("Neg", [p + "r2"], [p + "dead"]),
            helper.make_node("Add", [p + "flat", p + "r2"], [p + "out"]),
        ]
        h = p + "out"
    for j in range(n_nodes - len(nodes)):
        nodes.append(helper.make_node("Relu", [h], [f"pad{j}"]))
        h = f"pad{j}"
    graph = helper.make_graph(
        nodes, "synthetic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, WIDTH])],
        [helper.make_tensor_value_info(h, TensorProto.FLOAT, [4, WIDTH])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert len(model.graph.node) == n_nodes
    return model


def measure(proto: onnx.ModelProto, repeat: int) -> dict[str, float]:
    import onnx_ir as ir

    times: dict[str, list[float]] = {"import": [], "O1": [], "export": []}
    nodes_after = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        model, _ = import_onnx(proto)
        t1 = time.perf_counter()
        PassManager(opt_level_pipeline(1)).run(model)
        t2 = time.perf_counter()
        ir.to_proto(model).SerializeToString(deterministic=True)
        t3 = time.perf_counter()
        times["import"].append(t1 - t0)
        times["O1"].append(t2 - t1)
        times["export"].append(t3 - t2)
        nodes_after = sum(1 for _ in model.graph)
    out = {k: statistics.median(v) for k, v in times.items()}
    out["nodes_after"] = nodes_after
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        proto = build(n)
        m = measure(proto, args.repeat)
        rows.append((n, m))
    print(f"{'nodes':>7} {'after -O1':>9} {'import s':>9} {'-O1 s':>8} {'export s':>9} {'-O1 us/node':>12} {'ratio':>6}")
    base = rows[0][1]["O1"] / rows[0][0]
    for n, m in rows:
        per = m["O1"] / n
        print(f"{n:>7} {m['nodes_after']:>9} {m['import']:>9.3f} {m['O1']:>8.3f} {m['export']:>9.3f} {per * 1e6:>12.1f} {per / base:>6.2f}")
    ratio = (rows[-1][1]["O1"] / rows[-1][0]) / base
    verdict = "linear" if ratio <= 1.5 else "SUPERLINEAR"
    print(f"per-node cost ratio {rows[-1][0]} vs {rows[0][0]} nodes: {ratio:.2f} ({verdict}; goal <= 1.5)")


if __name__ == "__main__":
    main()
