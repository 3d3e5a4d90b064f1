"""A model over 2 GB (external data) imports lazily, compiles and runs.

The weight file is sparse (a few written rows, the rest holes), so the test
costs disk only for what it writes; onnxruntime and kiln still see 2.2 GB.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import compiler

ROWS, COLS = 540_000, 1024  # 540000 * 1024 * 4 bytes = 2.21 GB > 2 GiB


@pytest.mark.slow
def test_over_2gb_model_round_trip(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    nbytes = ROWS * COLS * 4
    assert nbytes > 2**31
    rows = {0: 1.0, 123_456: 2.5, ROWS - 1: -3.0}
    with open(src / "weights.bin", "wb") as f:
        f.truncate(nbytes)
        for row, value in rows.items():
            f.seek(row * COLS * 4)
            f.write(np.full(COLS, value, np.float32).tobytes())
    weight = TensorProto(name="table", data_type=TensorProto.FLOAT, dims=[ROWS, COLS])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "weights.bin"), ("offset", "0"), ("length", str(nbytes))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0)], "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["n", COLS])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, src / "model.onnx")  # the proto itself is tiny

    art = compiler.compile(src / "model.onnx", output=tmp_path / "art", verify=False)
    assert sorted(f["path"] for f in art.manifest["files"]) == ["model.onnx", "model.onnx.data"]
    assert (art.path / "model.onnx.data").stat().st_size == nbytes
    assert (art.path / "model.onnx").stat().st_size < 10_000
    ids = np.array(sorted(rows) + [7], np.int64)
    got = art.run({"ids": ids})["rows"]
    want = np.array([[rows[r]] * COLS for r in sorted(rows)] + [[0.0] * COLS], np.float32)
    np.testing.assert_array_equal(got, want)
