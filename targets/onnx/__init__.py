"""The ONNX backend: ``model.onnx`` (+ ``model.onnx.data`` when large), run with onnxruntime."""

from targets.onnx.emit import emit, legalize
from targets.onnx.run import load

__all__ = ["emit", "legalize", "load"]
