"""The five cleanup passes together: fixed points, control flow, and a
property test over random small graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from compiler.ir.verifier import verify_model
from compiler.passes import OPT_LEVELS
from tests.helpers import (
    all_op_types,
    assert_same_outputs,
    assert_unique_names,
    io_signature,
    model_from_proto,
    op_types,
    optimize,
    run_passes,
    snapshot,
)

O1 = OPT_LEVELS[1]
PASSES = ["eliminate-identity", "fold-shapes", "fold-constants", "cse", "eliminate-dead"]

MIXED = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x, bool c) => (float[6] y, float[2,3] z) <float[3] w = {1.0, 2.0, 3.0}, float[3] w2 = {1.0, 2.0, 3.0}> {
      i = Identity(x)
      k = Constant<value = float[3] {0.5, 0.5, 0.5}>()
      kw = Mul(k, w)
      a1 = Add(i, kw)
      a2 = Add(i, kw)
      b = Mul(a1, w2)
      s = Shape(b)
      n = ReduceProd<keepdims = 1>(s)
      flat = Reshape(a2, n)
      dead = Neg(b)
      y = If (c) <
        then_branch = t () => (float[6] o1) { q = Identity(flat) o1 = Relu(q) },
        else_branch = e () => (float[6] o2) { r = Mul(kw, kw) o2 = Neg(flat) }
      >
      z = Sub(a1, b)
    }"""
MIXED_FEEDS = {"x": np.arange(6, dtype=np.float32).reshape(2, 3) - 2, "c": np.array(True)}


@pytest.mark.parametrize("name", PASSES)
def test_each_pass_reaches_a_fixed_point_in_one_run(name):
    model, report = optimize(MIXED, name, feeds=MIXED_FEEDS)
    assert report.modified
    again = run_passes(model, name)
    assert not again.modified


def test_o1_cleans_the_mixed_model():
    model, report = optimize(MIXED, O1, feeds=MIXED_FEEDS)
    assert report.modified
    assert op_types(model) == ["Add", "Mul", "Reshape", "If", "Sub"]
    assert sorted(all_op_types(model)) == ["Add", "If", "Mul", "Neg", "Relu", "Reshape", "Sub"]
    again = run_passes(model, O1)
    assert not again.modified


def test_o2_fixpoint_converges_and_stays_equal():
    model, report = optimize(MIXED, OPT_LEVELS[2], feeds=MIXED_FEEDS)
    assert report.modified
    last_round = max(r.iteration for r in report.records)
    assert not any(r.modified for r in report.records if r.iteration == last_round)


def test_loop_and_scan_models_survive_o1():
    model, report = optimize(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x, float[3,2] seq) => (float[2] y, float[2] last, float[3,2] scanned)
          <int64 n = {3}, bool t = {1}, float[2] one = {1.0, 1.0}> {
          two = Add(one, one)
          y = Loop (n, t, x) <body = body (int64 i, bool cond, float[2] acc) => (bool cond_out, float[2] acc_out) {
            cond_out = Identity(cond)
            s = Shape(acc)
            f = Cast<to = 1>(s)
            scaled = Mul(acc, two)
            dup = Mul(acc, two)
            both = Add(scaled, dup)
            acc_out = Add(both, f)
          }>
          last, scanned = Scan (x, seq) <num_scan_inputs = 1, body = sbody (float[2] state, float[2] row) => (float[2] state_out, float[2] row_out) {
            k = Identity(two)
            state_out = Add(state, row)
            row_out = Mul(row, k)
          }>
        }""",
        O1,
    )
    assert report.modified
    assert op_types(model) == ["Loop", "Scan"]
    loop_body, scan_body = sorted(model.graph.subgraphs(), key=lambda g: g.name)
    assert [n.op_type for n in loop_body] == ["Identity", "Mul", "Add", "Add"]
    assert [n.op_type for n in scan_body] == ["Add", "Mul"]


def test_real_onnx_models_survive_o1():
    """A model from the onnx test data (IR version 3, weights built by ConstantOfShape)."""
    import pathlib

    data = pathlib.Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    path = data / "light_squeezenet.onnx"
    if not path.exists():
        pytest.skip("onnx test data not installed")
    proto = onnx.load(str(path))
    model = model_from_proto(proto)
    signature = io_signature(model)
    run_passes(model, O1)
    verify_model(model)
    assert io_signature(model) == signature
    assert "ConstantOfShape" in op_types(model)  # the 64 KiB+ weights stay unfolded
    assert_same_outputs(proto, model, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- property test

SHAPES = [(2, 3), (3,), (1,)]
BINARY = ["Add", "Sub", "Mul", "Max", "Min"]
UNARY = ["Relu", "Neg", "Abs", "Tanh", "Sigmoid", "Identity", "Dropout", "Cast"]


def _broadcast(a: tuple, b: tuple) -> tuple:
    return tuple(np.broadcast_shapes(a, b))


@st.composite
def small_graphs(draw) -> onnx.ModelProto:
    """Random elementwise/MatMul graphs over two inputs with constant operands
    (initializers or Constant nodes; random, all-ones or all-zeros), duplicated
    nodes, shape round trips and dead branches."""
    values: list[tuple[str, tuple]] = [("x0", (2, 3)), ("x1", (3,))]
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    produced: list[tuple[str, tuple]] = []

    def fresh(prefix: str) -> str:
        return f"{prefix}{len(nodes) + len(inits)}"

    def constant(shape: tuple) -> str:
        kind = draw(st.sampled_from(["random", "random", "ones", "zeros"]))
        if kind == "random":
            seed = draw(st.integers(0, 1000))
            array = np.random.default_rng(seed).uniform(-2, 2, size=shape).astype(np.float32)
        else:
            array = np.full(shape, 1.0 if kind == "ones" else 0.0, np.float32)
        name = fresh("k")
        if draw(st.booleans()):
            nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array)))
        else:
            inits.append(numpy_helper.from_array(array, name))
        return name

    def operand() -> tuple[str, tuple]:
        if draw(st.integers(0, 3)) == 0:
            shape = draw(st.sampled_from(SHAPES))
            return constant(shape), shape
        return draw(st.sampled_from(values))

    def emit(node: onnx.NodeProto, shape: tuple) -> None:
        nodes.append(node)
        values.append((node.output[0], shape))
        produced.append((node.output[0], shape))

    for _ in range(draw(st.integers(1, 10))):
        kind = draw(st.sampled_from(["binary", "binary", "unary", "matmul", "reshape", "const", "duplicate"]))
        out = fresh("v")
        if kind == "binary":
            (a, sa), (b, sb) = operand(), operand()
            emit(helper.make_node(draw(st.sampled_from(BINARY)), [a, b], [out]), _broadcast(sa, sb))
        elif kind == "unary":
            a, sa = draw(st.sampled_from(values))
            op = draw(st.sampled_from(UNARY))
            attrs = {"to": TensorProto.FLOAT} if op == "Cast" else {}
            emit(helper.make_node(op, [a], [out], **attrs), sa)
        elif kind == "matmul":
            a, sa = draw(st.sampled_from(values))
            if sa == (1,):
                continue
            emit(helper.make_node("MatMul", [a, constant((3, 3))], [out]), sa)
        elif kind == "reshape":
            a, sa = draw(st.sampled_from(values))
            shape = fresh("s")
            nodes.append(helper.make_node("Shape", [a], [shape]))
            emit(helper.make_node("Reshape", [a, shape], [out]), sa)
        elif kind == "const":
            shape = draw(st.sampled_from(SHAPES))
            a, b = constant(shape), constant(shape)
            emit(helper.make_node(draw(st.sampled_from(BINARY)), [a, b], [out]), shape)
        else:
            shapes = dict(produced)
            computing = [n for n in nodes if n.output[0] in shapes]
            if not computing:
                continue
            original = draw(st.sampled_from(computing))
            copy = onnx.NodeProto()
            copy.CopyFrom(original)
            copy.output[0] = out
            emit(copy, shapes[original.output[0]])
    if not produced:
        (a, sa) = draw(st.sampled_from(values))
        emit(helper.make_node("Relu", [a], [fresh("v")]), sa)

    outputs = [produced[-1]]
    extra = draw(st.sampled_from(produced))
    if extra[0] != outputs[0][0]:
        outputs.append(extra)
    graph = helper.make_graph(
        nodes,
        "random",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in values[:2]],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


FEEDS = {
    "x0": np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32),
    "x1": np.random.default_rng(2).standard_normal(3).astype(np.float32),
}


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(small_graphs())
def test_o1_keeps_random_graphs_valid_and_equal(proto):
    onnx.checker.check_model(proto)
    model = model_from_proto(proto)
    signature = io_signature(model)
    report = run_passes(model, O1)
    verify_model(model)
    assert io_signature(model) == signature
    assert_unique_names(model)
    assert_same_outputs(proto, snapshot(model), FEEDS, rtol=1e-5, atol=1e-5)
    again = run_passes(model, O1)
    assert_same_outputs(proto, snapshot(model), FEEDS, rtol=1e-5, atol=1e-5)
    del report, again
