"""Verifier, quantization record and metadata."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest

from compiler.errors import VerificationError
from compiler.ir import ModelMetadata, QuantRecord, find_problems, get_metadata, get_quant, set_metadata, set_quant, verify_model

TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[4] x) => (float[4] y) {
    a = Relu(x)
    y = Neg(a)
}
"""


def _model():
    return ir.serde.deserialize_model(onnx.parser.parse_model(TEXT))


def test_valid_model_has_no_problems():
    assert find_problems(_model()) == []


def test_out_of_order_nodes_are_caught():
    model = _model()
    relu, neg = list(model.graph)
    model.graph.remove(neg)
    model.graph.insert_before(relu, neg)
    problems = find_problems(model)
    assert any("'a'" in p and "not defined before use" in p for p in problems)


def test_duplicate_names_and_untyped_io_are_caught():
    model = _model()
    relu, neg = list(model.graph)
    relu.outputs[0].name = "dup"
    model.graph.inputs[0].name = "dup"
    model.graph.inputs[0].type = None
    problems = find_problems(model)
    assert any("two values are named 'dup'" in p for p in problems)
    assert any("graph input 'dup' has no type" in p for p in problems)
    with pytest.raises(VerificationError, match="IR problem"):
        verify_model(model)


def test_undefined_graph_output_is_caught():
    model = _model()
    stray = ir.Value(name="stray", type=ir.TensorType(ir.DataType.FLOAT))
    model.graph.outputs.append(stray)
    assert any("output 'stray'" in p for p in find_problems(model))


def test_quant_record_survives_serialization():
    model = _model()
    record = QuantRecord(scheme="w4", bits=4, block_size=32, axis=1, symmetric=False, zero_dtype="uint8", packing="nibble-lo-first")
    set_quant(model.graph.inputs[0], record)
    proto = ir.serde.serialize_model(model)
    again = ir.serde.deserialize_model(proto)
    assert get_quant(again.graph.inputs[0]) == record
    set_quant(again.graph.inputs[0], None)
    assert get_quant(again.graph.inputs[0]) is None


@pytest.mark.parametrize("kwargs", [dict(bits=7), dict(block_size=-2), dict(symmetric=True, zero_dtype="uint8"), dict(symmetric=False)])
def test_quant_record_rejects_nonsense(kwargs):
    with pytest.raises(ValueError):
        QuantRecord(**{"scheme": "x", "bits": 8, **kwargs})


def test_metadata_round_trip():
    model = _model()
    assert get_metadata(model) == ModelMetadata()
    meta = ModelMetadata(source_format="safetensors", architecture={"family": "llama", "heads": 8})
    set_metadata(model, meta)
    again = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    assert get_metadata(again) == meta
