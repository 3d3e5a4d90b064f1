"""The Python API: compile from a path, a ModelProto or an onnx_ir.Model; Artifact.run; determinism."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import compiler
from compiler.errors import ArtifactError, KilnError, ModelFormatError
from tests.e2e.conftest import EXAMPLE


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_input_same_bytes(tmp_path):
    a = compiler.compile(str(EXAMPLE), target="x86_64-linux-gnu", output=tmp_path / "a")
    b = compiler.compile(str(EXAMPLE), target="x86_64-linux-gnu", output=tmp_path / "b")
    fa, fb = _files(a.path), _files(b.path)
    assert fa.keys() == fb.keys() == {"manifest.json", "model.onnx"}
    assert fa == fb


def test_same_bytes_across_source_kinds_and_levels(tmp_path):
    proto = onnx.load(EXAMPLE)
    for level in (0, 1, 2):
        a = compiler.compile(proto, output=tmp_path / f"p{level}", opt_level=level)
        b = compiler.compile(ir.serde.deserialize_model(proto), output=tmp_path / f"i{level}", opt_level=level)
        graph_a = onnx.load(a.path / "model.onnx").graph.SerializeToString(deterministic=True)
        graph_b = onnx.load(b.path / "model.onnx").graph.SerializeToString(deterministic=True)
        assert graph_a == graph_b


@pytest.mark.parametrize("kind", ["path", "proto", "ir"])
def test_compile_and_run_each_source_kind(tmp_path, kind):
    source = {"path": str(EXAMPLE), "proto": onnx.load(EXAMPLE), "ir": ir.load(EXAMPLE)}[kind]
    art = compiler.compile(source, target="x86_64-linux-gnu", emit="onnx", output=tmp_path / "o")
    assert art.manifest["verification"]["passed"] is True
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    got = art.run({"image": x})["probs"]
    want = ort.InferenceSession(str(EXAMPLE), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    reloaded = compiler.load_artifact(art.path)
    np.testing.assert_array_equal(reloaded.run({"image": x})["probs"], got)


def test_ir_model_is_not_modified_by_compile(tmp_path):
    model = ir.load(EXAMPLE)
    before = len(list(model.graph))
    compiler.compile(model, output=tmp_path / "o")
    assert len(list(model.graph)) == before


def test_errors_are_kiln_errors(tmp_path):
    with pytest.raises(ModelFormatError):
        compiler.compile(tmp_path / "missing.onnx", output=tmp_path / "o")
    with pytest.raises(KilnError, match="unknown optimization level"):
        compiler.compile(str(EXAMPLE), output=tmp_path / "o", opt_level=9)
    with pytest.raises(ArtifactError):
        compiler.load_artifact(tmp_path)
    assert not (tmp_path / "o").exists()


def _big_weight_model(n: int) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(n * n, dtype=np.float32).reshape(n, n) / (n * n), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])], initializer=[w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_external_data_out_and_in(tmp_path):
    proto = _big_weight_model(64)
    art = compiler.compile(proto, output=tmp_path / "ext", external_data_threshold=0)
    assert sorted(f["path"] for f in art.manifest["files"]) == ["model.onnx", "model.onnx.data"]
    assert (art.path / "model.onnx.data").stat().st_size == 64 * 64 * 4
    x = np.ones((2, 64), np.float32)
    want = x @ numpy_helper.to_array(proto.graph.initializer[0])
    np.testing.assert_allclose(art.run({"x": x})["y"], want, rtol=1e-5)
    # Compile the artifact's own (external-data) model again: weights must travel into the new artifact.
    again = compiler.compile(art.path / "model.onnx", output=tmp_path / "again")
    assert "model.onnx.data" in {f["path"] for f in again.manifest["files"]}
    np.testing.assert_allclose(again.run({"x": x})["y"], want, rtol=1e-5)
    # The symbolic batch dim stays symbolic and random inputs pick 1 for it.
    assert again.inputs[0]["shape"] == ["batch", 64]
    assert again.run()["y"].shape == (1, 64)


def test_external_data_outside_model_folder_is_rejected(tmp_path):
    proto = _big_weight_model(16)
    tensor = proto.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    (tmp_path / "m").mkdir()
    onnx.save(proto, tmp_path / "m" / "evil.onnx")
    with pytest.raises(ModelFormatError, match="outside the model's folder"):
        compiler.compile(tmp_path / "m" / "evil.onnx", output=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_subgraphs_and_functions_survive(tmp_path):
    text = """
    <ir_version: 8, opset_import: ["" : 17, "local" : 1]>
    g (float[3] x, bool c) => (float[3] y) {
        one = Constant <value = float[1] {1.0}> ()
        t = local.AddOne(x)
        y = If(c) <
            then_branch = then_g () => (float[3] a) { a = Add(t, one) },
            else_branch = else_g () => (float[3] b) { i = Identity(t) b = Neg(i) }
        >
    }
    <domain: "local", opset_import: ["" : 17]>
    AddOne (u) => (v) {
        k = Constant <value = float[1] {1.0}> ()
        v = Add(u, k)
    }
    """
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto)
    art = compiler.compile(proto, output=tmp_path / "o", opt_level=2)
    out = onnx.load(art.path / "model.onnx")
    assert [n.op_type for n in out.graph.node if n.op_type == "If"] == ["If"]
    assert [f.name for f in out.functions] == ["AddOne"]
    x = np.array([1, 2, 3], np.float32)
    for c in (True, False):
        want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x, "c": np.array(c)})[0]
        np.testing.assert_allclose(art.run({"x": x, "c": np.array(c)})["y"], want)


def _layer_norm_model(op: str, opset: int) -> onnx.ModelProto:
    scale = numpy_helper.from_array(np.linspace(0.5, 1.5, 8).astype(np.float32), "scale")
    node = helper.make_node(op, ["x", "scale"], ["y"], axis=-1, epsilon=1e-5)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], initializer=[scale])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("op, opset", [("SimplifiedLayerNormalization", 17), ("LayerNormalization", 14)])
def test_onnx_domain_contrib_ops_legal_only_with_contrib_runtime(tmp_path, op, opset):
    """onnxruntime registers these contrib kernels in the ONNX domain; targets without contrib ops refuse them."""
    model = _layer_norm_model(op, opset)
    art = compiler.compile(model, target="x86_64-linux-gnu", output=tmp_path / "ok", opt_level=0)
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(art.run({"x": x})["y"], want, rtol=1e-6)
    from targets.onnx import legalize
    from targets.triple import resolve_target

    spec = resolve_target("x86_64-linux-gnu")
    no_contrib = type(spec)(**{**spec.__dict__, "onnx_runtime_contrib": False})
    problems = legalize(ir.serde.deserialize_model(model), no_contrib)
    assert len(problems) == 1 and op in problems[0]
