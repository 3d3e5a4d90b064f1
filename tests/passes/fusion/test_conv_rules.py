"""The rule framework (passes/fusion/_rules.py) under the conv/layout passes:
subgraphs, functions, IR < 4, names, reports, linear cost."""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir

from compiler.ir.verifier import verify_model
from passes.fusion import _rules
from passes.fusion.conv import FoldScaleIntoWeights, FuseBatchNorm
from passes.fusion.layout import SimplifyLayout
from tests.helpers import all_op_types, assert_same_outputs, assert_unique_names, model_from_proto, op_types, snapshot
from tests.passes.fusion import ATOL, RTOL, const, fuse, model_text


def _conv_mul_branch(name: str, w: np.ndarray, k: np.ndarray, out: str) -> onnx.GraphProto:
    return oh.make_graph(
        [
            oh.make_node("Conv", ["x", "W"], [f"{name}_c"]),
            oh.make_node("Mul", [f"{name}_c", f"{name}_k"], [out]),
        ],
        name,
        [],
        [oh.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(k, f"{name}_k")],
    )


def _if_model(w: np.ndarray, k: np.ndarray, *, shared: bool) -> onnx.ModelProto:
    then = _conv_mul_branch("then", w, k, "t_out")
    other = _conv_mul_branch("else", w * 2, k, "e_out")
    initializers = [onnx.numpy_helper.from_array(w, "W")]
    if not shared:
        other.node[0].input[1] = "W2"
        initializers.append(onnx.numpy_helper.from_array(w * 2, "W2"))
    graph = oh.make_graph(
        [oh.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
        "g",
        [
            oh.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []),
            oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 6, 6]),
        ],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 4, 4])],
        initializers,
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


def test_rules_run_inside_if_branches():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    k = rng.uniform(0.5, 1.5, (4, 1, 1)).astype(np.float32)
    # W is shared by both branches: folding would copy it, so both refuse.
    report = FoldScaleIntoWeights().run(model_from_proto(_if_model(w, k, shared=True)))
    assert report.reasons() == ["Conv weight is shared with another node"] * 2
    # With a weight of its own per branch, both fold (new weights live in the branch).
    proto = _if_model(w, k, shared=False)
    model = model_from_proto(proto)
    report = FoldScaleIntoWeights().run(model)
    assert report.fired_rules() == ["conv-mul", "conv-mul"]
    verify_model(model)
    assert all_op_types(model) == ["If", "Conv", "Conv"]
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)}
        assert_same_outputs(proto, model, feeds, rtol=RTOL, atol=ATOL)


def test_rules_run_inside_functions_with_constant_nodes():
    rng = np.random.default_rng(1)
    w = onnx.numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32))
    stats = [rng.uniform(0.5, 1.5, 4).astype(np.float32) for _ in range(4)]
    nodes = [oh.make_node("Constant", [], ["W"], value=w)]
    for name, array in zip("sbmv", stats):
        nodes.append(oh.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(array)))
    nodes += [
        oh.make_node("Conv", ["x", "W"], ["c"]),
        oh.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"]),
    ]
    function = oh.make_function("local", "ConvBn", ["x"], ["y"], nodes, [oh.make_opsetid("", 17)])
    graph = oh.make_graph(
        [oh.make_node("ConvBn", ["x"], ["y"], domain="local")],
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 6, 6])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 4, 4])],
    )
    proto = oh.make_model(
        graph, functions=[function], opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("local", 1)], ir_version=8
    )
    model = model_from_proto(proto)
    report = FuseBatchNorm().run(model)
    assert report.fired_rules() == ["conv-batchnorm"]
    verify_model(model)
    body = [n.op_type for n in next(iter(model.functions.values()))]
    assert body == ["Constant", "Constant", "Conv"]  # the folded weight and bias; the old ones are gone
    assert_same_outputs(proto, model, rtol=RTOL, atol=ATOL)


def test_fresh_names_never_collide():
    # The folded bias wants the name "W_bias", which a graph value already has.
    text = model_text(
        "float[1,3,6,6] x",
        "float[1,4,4,4] y, float[1,3,6,6] W_bias",
        [const("W", [4, 3, 3, 3]), const("k", [4, 1, 1])],
        "W_bias = Relu(x)\n        c = Conv(x, W)\n        y = Add(c, k)",
    )
    model, _ = fuse(text, "fuse-bias")
    assert op_types(model) == ["Relu", "Conv"]
    assert model.graph[1].inputs[2].name == "W_bias_1"


def test_report_lists_fired_and_refused():
    text = model_text(
        "float[1,3,6,6] x",
        "float[1,4,4,4] y, float[1,4,4,4] z",
        [const("W", [4, 3, 3, 3]), const("V", [4, 3, 3, 3]), const("k", [4, 1, 1])],
        "c = Conv(x, W)\n        y = Mul(c, k)\n        d = Conv(x, V)\n        z = Mul(d, d)",
    )
    model = ir.serde.deserialize_model(onnx.parser.parse_model(text))
    report = FoldScaleIntoWeights().run(model)
    assert report.modified and report.count("conv-mul") == 1
    assert [(r.rule, r.reason) for r in report.refused] == [("conv-mul", "the other Mul operand is not constant")]


def test_unmodified_model_is_untouched():
    text = model_text("float[2,3] x", "float[2,3] y", [], "y = Relu(x)")
    model, report = fuse(text, "fuse-batchnorm,fuse-bias,fold-scale-into-weights,fuse-matmul-add,fuse-pad,simplify-layout,simplify-concat-slice,fuse-conv-activation{contrib=true}")
    assert not report.modified


def test_walk_is_linear_in_the_graph_size():
    def chain(n: int) -> ir.Model:
        body = []
        prev = "x"
        for i in range(n):
            body.append(f"t{i} = Transpose <perm=[1,0]> ({prev})")
            body.append(f"u{i} = Transpose <perm=[1,0]> (t{i})")
            body.append(f"r{i} = Relu(u{i})")
            prev = f"r{i}"
        body.append(f"y = Identity({prev})")
        text = model_text("float[2,3] x", "float[2,3] y", [], "\n        ".join(body))
        return ir.serde.deserialize_model(onnx.parser.parse_model(text))

    timings = {}
    for n in (500, 2000):
        model = chain(n)
        start = time.perf_counter()
        report = SimplifyLayout().run(model)
        timings[n] = time.perf_counter() - start
        assert report.count("transpose-transpose") == n
        assert len(model.graph) == n + 1
    verify_model(model)
    assert_unique_names(model)
    # 4x the nodes may cost 4x the time, not 16x (generous for a noisy machine).
    assert timings[2000] < 10 * timings[500] + 0.5, timings


def test_broken_node_is_reported_not_raised():
    # A Gemm whose weight is 3-D (an invalid model) is refused with a reason.
    text = model_text(
        "float[2,3] x",
        "float[2,5] y",
        [const("W", [1, 3, 5]), const("k", [5])],
        "g = Gemm(x, W)\n        y = Mul(g, k)",
    )
    model = ir.serde.deserialize_model(onnx.parser.parse_model(text))
    report = FoldScaleIntoWeights().run(model)
    assert report.reasons() == ["Gemm weight has rank 3"]
    assert isinstance(report.refused[0], _rules.Refusal)


def test_snapshot_unchanged_when_refused():
    text = model_text(
        "float[1,3,6,6] x, float[4,3,3,3] W",
        "float[1,4,4,4] y",
        [const("k", [4, 1, 1])],
        "c = Conv(x, W)\n        y = Mul(c, k)",
    )
    model = ir.serde.deserialize_model(onnx.parser.parse_model(text))
    before = snapshot(model).SerializeToString()
    FoldScaleIntoWeights().run(model)
    assert snapshot(model).SerializeToString() == before
