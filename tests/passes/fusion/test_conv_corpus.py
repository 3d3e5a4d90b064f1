"""The conv/linear/layout fusions over the CNNs in the onnx wheel's test data.

The light models (alexnet, densenet121, inception v1/v2, resnet50,
shufflenet, squeezenet, vgg19, zfnet512) store each weight as a
ConstantOfShape of a shape initializer, and list their initializers as graph
inputs (IR 3), which makes every weight overridable and so not foldable.
``freeze`` turns them into what a deployed model is: seeded random weights
(He-scaled, positive vectors so BatchNormalization variances are valid) as
plain initializers that are no graph inputs. The fused model must then give
onnxruntime's outputs of the frozen original on seeded random inputs.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from compiler.ir.verifier import verify_model
from tests.helpers import model_from_proto, run_ort, snapshot
from tests.passes.fusion import ATOL, RTOL

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"

#: -O1's cleanup and the fusions of this package, to a fixed point (what
#: -O2/-O3 run; fold-constants turns the Unsqueezed BatchNorm scales of
#: densenet/inception_v2 into constants the fusions can use).
CLEANUP = "eliminate-identity,fold-shapes,fold-constants,cse,eliminate-dead"
FUSIONS = (
    "fuse-pad,fuse-batchnorm,fold-scale-into-weights,fuse-bias,fuse-matmul-add,"
    "simplify-layout,simplify-concat-slice,fuse-conv-activation{contrib=true}"
)
PIPELINE = f"fixpoint({CLEANUP},{FUSIONS})"

#: Each light model and the most nodes it may have after PIPELINE (a
#: regression guard: a rule that silently stops firing shows up here).
LIGHT_NODES_AFTER = {
    "bvlc_alexnet": 17,  # 40 nodes before
    "densenet121": 308,  # 1746
    "inception_v1": 86,  # 237
    "inception_v2": 95,  # 916
    "resnet50": 58,  # 415
    "shufflenet": 111,  # 446
    "squeezenet": 39,  # 105
    "vgg19": 28,  # 82
    "zfnet512": 17,  # 38
}


def freeze(proto: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Weights as constant initializers (not graph inputs), ConstantOfShape
    weights replaced by seeded random data, IR version raised to 7."""
    rng = np.random.default_rng(seed)
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    shapes = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    kept_nodes, new_inits, used_shapes = [], [], set()
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input and node.input[0] in shapes:
            shape = [int(d) for d in shapes[node.input[0]]]
            used_shapes.add(node.input[0])
            new_inits.append(numpy_helper.from_array(_random_weight(rng, shape), node.output[0]))
        else:
            kept_nodes.append(node)
    del graph.node[:]
    graph.node.extend(kept_nodes)
    still_used = {name for node in kept_nodes for name in node.input}
    inits = [t for t in graph.initializer if t.name not in used_shapes or t.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(inits + new_inits)
    names = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in names]
    del graph.input[:]
    graph.input.extend(inputs)
    model.ir_version = max(model.ir_version, 7)
    return model


def _random_weight(rng: np.random.Generator, shape: list[int]) -> np.ndarray:
    if len(shape) <= 1:
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    fan_in = int(np.prod(shape[1:]))
    weight = rng.standard_normal(shape, dtype=np.float32)
    weight *= np.float32(np.sqrt(2.0 / fan_in))
    return weight


def _feeds(proto: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for info in proto.graph.input:
        dims = [d.dim_value or 1 for d in info.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type)
        feeds[info.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


def optimize_and_compare(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], pipeline: str = PIPELINE):
    """Run the pipeline on the model; assert outputs match; (model, nodes before, after)."""
    from compiler.passes import PassManager

    model = model_from_proto(proto)
    before = len(model.graph)
    PassManager(pipeline).run(model)
    verify_model(model)
    expected = run_ort(proto, feeds)
    actual = run_ort(snapshot(model), feeds)
    for i, (want, got) in enumerate(zip(expected, actual)):
        scale = max(1.0, float(np.max(np.abs(want)))) if np.size(want) else 1.0
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL * scale, err_msg=f"output {i}")
    return model, before, len(model.graph)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LIGHT_NODES_AFTER))
def test_light_models(name):
    proto = freeze(onnx.load(str(DATA / "light" / f"light_{name}.onnx")))
    model, before, after = optimize_and_compare(proto, _feeds(proto))
    assert after <= LIGHT_NODES_AFTER[name], f"{name}: {before} -> {after} nodes"


def _converted_cases() -> list[str]:
    return sorted(glob.glob(str(DATA / "pytorch-converted" / "*" / "model.onnx")))


@pytest.mark.slow
def test_pytorch_converted_models():
    checked = 0
    for path in _converted_cases():
        folder = Path(path).parent
        proto = freeze(onnx.load(path))
        inputs = sorted(glob.glob(str(folder / "test_data_set_0" / "input_*.pb")), key=_index)
        if not inputs:
            continue
        names = [i.name for i in proto.graph.input]
        feeds = {}
        for name, file in zip(names, inputs):
            tensor = onnx.TensorProto()
            tensor.ParseFromString(Path(file).read_bytes())
            feeds[name] = numpy_helper.to_array(tensor)
        try:
            run_ort(proto, feeds)
        except Exception:  # noqa: BLE001 - a case onnxruntime cannot run is not ours to check
            continue
        optimize_and_compare(proto, feeds)
        checked += 1
    assert checked >= 50


def _index(path: str) -> int:
    return int(os.path.basename(path).split("_")[1].split(".")[0])
