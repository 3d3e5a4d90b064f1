"""ONNX importer: a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model`` → ``onnx_ir.Model``.

External data stays memory-mapped (models over 2 GB import without loading
their weights); external-data locations must stay inside the model's folder.
If/Loop/Scan subgraphs and model-local functions are kept as they are.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from compiler.errors import ModelFormatError, UnsupportedError
from compiler.ir.metadata import get_metadata, set_metadata

_CHUNK = 1 << 22


def import_onnx(source: str | os.PathLike | onnx.ModelProto | ir.Model) -> tuple[ir.Model, str]:
    """Return the model as IR and the sha256 of its serialized form (weights included)."""
    if isinstance(source, ir.Model):
        proto = ir.to_proto(source)
        model, digest = _from_proto(proto, "<onnx_ir.Model>")
        _copy_base_dir(source, model)
        return model, digest
    if isinstance(source, onnx.ModelProto):
        return _from_proto(source, "<onnx.ModelProto>")
    return _from_path(Path(source))


def _from_path(path: Path) -> tuple[ir.Model, str]:
    if not path.exists():
        raise ModelFormatError(f"{path}: no such file")
    if path.is_dir():
        raise ModelFormatError(f"{path}: is a directory, not an ONNX model file")
    data = path.read_bytes()
    proto = _parse(data, str(path))
    _check_external_locations(proto, path)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as err:
        raise ModelFormatError(f"{path}: not a valid ONNX model ({_short(err)})") from None
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    digest = hashlib.sha256(data)
    for location in sorted(_external_locations(proto)):
        with open(path.parent / location, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    _finish(model, digest.hexdigest(), str(path))
    return model, digest.hexdigest()


def _from_proto(proto: onnx.ModelProto, label: str) -> tuple[ir.Model, str]:
    _check_model_proto(proto, label)
    digest = hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as err:
        raise ModelFormatError(f"{label}: not a valid ONNX model ({_short(err)})") from None
    _finish(model, digest, label)
    return model, digest


def _parse(data: bytes, label: str) -> onnx.ModelProto:
    if not data:
        raise ModelFormatError(f"{label}: the file is empty, not an ONNX model")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as err:
        raise ModelFormatError(f"{label}: not an ONNX model (protobuf parse failed: {_short(err)})") from None
    _check_model_proto(proto, label)
    return proto


def _check_model_proto(proto: onnx.ModelProto, label: str) -> None:
    # Protobuf parses many byte strings "successfully"; a real model has these.
    if proto.ir_version <= 0 or not proto.HasField("graph"):
        raise ModelFormatError(f"{label}: not an ONNX model (no IR version or no graph)")
    if not proto.graph.node and not proto.graph.output:
        raise ModelFormatError(f"{label}: the ONNX graph is empty (no nodes, no outputs)")
    newest = onnx.defs.onnx_opset_version()
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > newest:
            raise UnsupportedError(
                f"{label}: uses ONNX opset {opset.version}; the installed onnx knows up to {newest}",
                hint="upgrade onnx, or export the model at a lower opset",
            )


def _external_locations(proto: onnx.ModelProto) -> set[str]:
    locations = set()
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    return locations


def _check_external_locations(proto: onnx.ModelProto, path: Path) -> None:
    base = path.parent.resolve()
    for location in _external_locations(proto):
        target = (base / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(base):
            raise ModelFormatError(
                f"{path}: external data location {location!r} points outside the model's folder"
            )
        if not target.is_file():
            raise ModelFormatError(f"{path}: external data file {location!r} is missing")


def _copy_base_dir(source: ir.Model, model: ir.Model) -> None:
    # An in-memory onnx_ir model may hold external tensors; keep their folder.
    for value in source.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            ir.external_data.set_base_dir(model.graph, tensor.base_dir)
            return


def _finish(model: ir.Model, digest: str, label: str) -> None:
    meta = get_metadata(model)
    if meta.source_sha256 is None:
        meta.source_format = "onnx"
        meta.source_sha256 = digest
        set_metadata(model, meta)


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__
