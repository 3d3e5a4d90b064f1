"""Build examples/models/tiny_cnn.onnx: a small image classifier with fixed random weights.

It carries the leftovers exporters leave behind (Identity, Dropout, a shape
computation feeding Reshape) so `kiln compile -O1` has work to do.
Run: python examples/make_tiny_cnn.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(7)

    def init(name: str, *shape: int, scale: float = 0.1) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [
        init("conv1.w", 8, 3, 3, 3), init("conv1.b", 8),
        init("bn.scale", 8, scale=1.0), init("bn.bias", 8), init("bn.mean", 8),
        numpy_helper.from_array(np.abs(rng.standard_normal(8)).astype(np.float32) + 0.5, "bn.var"),
        init("conv2.w", 16, 8, 3, 3), init("conv2.b", 16),
        init("fc.w", 10, 16 * 8 * 8), init("fc.b", 10),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "minus_one"),
    ]
    nodes = [
        helper.make_node("Identity", ["image"], ["x0"], name="input_copy"),
        helper.make_node("Conv", ["x0", "conv1.w", "conv1.b"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["b1"], name="bn1"),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
        helper.make_node("Conv", ["p1", "conv2.w", "conv2.b"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2], name="pool2"),
        helper.make_node("Dropout", ["p2"], ["d2"], name="dropout"),
        # Reshape target computed from the shape at run time: foldable when the batch is static.
        helper.make_node("Shape", ["d2"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["batch"], axis=0, name="batch_dim"),
        helper.make_node("Concat", ["batch", "minus_one"], ["flat_shape"], axis=0, name="flat_shape"),
        helper.make_node("Reshape", ["d2", "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], transB=1, name="fc"),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="softmax"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="kiln-examples")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


if __name__ == "__main__":
    out = Path(__file__).parent / "models" / "tiny_cnn.onnx"
    out.parent.mkdir(exist_ok=True)
    out.write_bytes(build().SerializeToString(deterministic=True))
    print(f"wrote {out}")
