from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from tests.helpers import op_types, optimize, run_passes

PASS = "fold-shapes"
HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def _initializer(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def test_shape_of_static_input_becomes_a_constant():
    model, report = optimize(
        f"""{HEADER}
        g (float[2,3,4] x) => (float[2,12] y) {{
          s = Shape<end = 1>(x)
          m = Constant<value = int64[1] {{-1}}>()
          t = Concat<axis = 0>(s, m)
          y = Reshape(x, t)
        }}""",
        PASS,
    )
    assert report.modified
    assert op_types(model) == ["Constant", "Concat", "Reshape"]
    np.testing.assert_array_equal(_initializer(model, "s"), [2])
    assert model.graph.initializers["s"].dtype == ir.DataType.INT64


def test_shape_start_end_and_size_fold_when_the_needed_dims_are_static():
    model, report = optimize(
        f"""{HEADER}
        g (float[N,3,4] x) => (float[N,12] y, int64[] n) {{
          s = Shape<start = -2>(x)
          p = ReduceProd<keepdims = 1>(s)
          m = Constant<value = int64[1] {{-1}}>()
          t = Concat<axis = 0>(m, p)
          y = Reshape(x, t)
          k = Shape<start = 1, end = 2>(x)
          z = Size(k)
          n = Identity(z)
        }}""",
        PASS,
    )
    assert report.modified
    np.testing.assert_array_equal(_initializer(model, "s"), [3, 4])
    np.testing.assert_array_equal(_initializer(model, "k"), [3])
    assert "Shape" not in op_types(model) and "Size" not in op_types(model)


def test_dynamic_dims_are_not_folded():
    _, report = optimize(
        f"""{HEADER}
        g (float[N,3] x) => (float[N,3] y) {{
          s = Shape(x)
          n = Size(x)
          y = Reshape(x, s)
        }}""",
        PASS,
    )
    assert not report.modified


def test_shape_that_is_a_graph_output_stays():
    _, report = optimize(
        f"""{HEADER}
        g (float[2,3] x) => (int64[2] s) {{
          s = Shape(x)
        }}""",
        PASS,
    )
    assert not report.modified


def test_runs_shape_inference_for_untyped_values_without_changing_graph_outputs():
    model, report = optimize(
        f"""{HEADER}
        g (float[2,3] x) => (float[M,K] y) {{
          r = Relu(x)
          t = Transpose<perm = [1, 0]>(r)
          s = Shape(t)
          y = Reshape(r, s)
        }}""",
        PASS,
    )
    assert report.modified
    np.testing.assert_array_equal(_initializer(model, "s"), [3, 2])
    (output,) = model.graph.outputs
    assert [str(d) for d in output.shape] == ["M", "K"]


def test_shape_inference_failure_is_tolerated(monkeypatch):
    def broken(*args, **kwargs):
        raise onnx.shape_inference.InferenceError("boom")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", broken)
    model, report = optimize(
        f"""{HEADER}
        g (float[2,3] x) => (float[3,2] y) {{
          r = Relu(x)
          s = Shape(r)
          k = Shape(x)
          t = Concat<axis = 0>(s, k)
          y = Reshape(r, t)
        }}""",
        PASS,
        compare=False,
    )
    assert report.modified  # Shape(x) needs no inference
    assert op_types(model) == ["Relu", "Shape", "Concat", "Reshape"]


def test_unknown_ops_leave_their_outputs_unfolded():
    _, report = optimize(
        """<ir_version: 8, opset_import: ["" : 17, "custom" : 1]>
        g (float[2,3] x) => (float[?] y) {
          r = custom.Mystery(x)
          s = Shape(r)
          y = Cast<to = 1>(s)
        }""",
        PASS,
        compare=False,
    )
    assert not report.modified


def test_folds_inside_if_branches():
    model, report = optimize(
        f"""{HEADER}
        g (float[2,3] x, bool c) => (float[6] y) <int64[1] zero = {{0}}> {{
          y = If (c) <
            then_branch = g1 () => (float[6] o1) {{
              s = Size(x)
              u = Unsqueeze(s, zero)
              o1 = Reshape(x, u)
            }},
            else_branch = g2 () => (float[6] o2) {{
              m = Constant<value = int64[1] {{6}}>()
              n = Neg(x)
              o2 = Reshape(n, m)
            }}
          >
        }}""",
        PASS,
        feeds={"x": np.ones((2, 3), np.float32), "c": np.array(True)},
    )
    assert report.modified
    then_branch = next(g for g in model.graph.subgraphs() if g.name == "g1")
    assert [n.op_type for n in then_branch] == ["Unsqueeze", "Reshape"]
    assert then_branch.initializers["s"].const_value.numpy() == 6


def test_second_run_changes_nothing():
    model, report = optimize(
        f"""{HEADER}
        g (float[2,3] x) => (float[3,2] y) {{
          r = Relu(x)
          t = Transpose<perm = [1, 0]>(r)
          s = Shape(t)
          y = Reshape(r, s)
        }}""",
        PASS,
    )
    assert report.modified
    assert not run_passes(model, PASS).modified
