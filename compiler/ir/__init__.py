"""kiln's thin layer over onnx_ir: quantization records, metadata, verifier."""

from compiler.ir.metadata import ModelMetadata, get_metadata, set_metadata
from compiler.ir.quant import QuantRecord, get_quant, set_quant
from compiler.ir.verifier import find_problems, verify_model

__all__ = [
    "ModelMetadata",
    "QuantRecord",
    "find_problems",
    "get_metadata",
    "get_quant",
    "set_metadata",
    "set_quant",
    "verify_model",
]
