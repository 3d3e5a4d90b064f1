"""Legalize and write an ONNX artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from targets.backend import EmitResult

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
#: Above this many initializer bytes the weights go to external data (protobuf caps a file at 2 GB).
EXTERNAL_DATA_THRESHOLD = 1 << 30
#: Tensors at least this large go to the external file when external data is used.
EXTERNAL_TENSOR_MIN_BYTES = 1024

_STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training")
_CONTRIB_DOMAINS = ("com.microsoft", "com.microsoft.nchwc", "com.ms.internal.nhwc")
#: onnxruntime contrib kernels registered in the ONNX domain (at any opset).
_CONTRIB_IN_ONNX_DOMAIN = frozenset({"SimplifiedLayerNormalization", "LayerNormalization"})


def legalize(model: ir.Model, spec: Any) -> list[str]:
    """Every node onnxruntime on the target cannot run, named, in one list."""
    problems: list[str] = []
    functions = {(f.domain, f.name, f.overload) for f in model.functions.values()}
    contrib = bool(getattr(spec, "onnx_runtime_contrib", True))
    seen: set[tuple[str, str, int]] = set()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        _check_node(node, model, functions, contrib, problems, seen)
    for function in model.functions.values():
        for node in function:
            _check_node(node, model, functions, contrib, problems, seen)
    return problems


def _check_node(node, model, functions, contrib, problems, seen) -> None:
    domain = "" if node.domain == "ai.onnx" else node.domain
    if (domain, node.op_type, node.overload) in functions:
        return
    label = f"node {node.name!r}" if node.name else "an unnamed node"
    if domain in _CONTRIB_DOMAINS or (domain == "" and contrib and node.op_type in _CONTRIB_IN_ONNX_DOMAIN):
        if not contrib:
            problems.append(f"{label}: {domain}::{node.op_type} needs onnxruntime contrib ops, which this target's runtime lacks")
        return
    if domain not in _STANDARD_DOMAINS:
        problems.append(f"{label}: custom op {domain}::{node.op_type} is not an ONNX or onnxruntime op")
        return
    version = model.opset_imports.get(domain, model.opset_imports.get("ai.onnx", 1) if domain == "" else 1)
    key = (domain, node.op_type, version)
    if key in seen:
        return
    seen.add(key)
    if not onnx.defs.has(node.op_type, domain):
        problems.append(f"{label}: {node.op_type} is not an op of domain {domain or 'ai.onnx'!r}")
        return
    try:
        onnx.defs.get_schema(node.op_type, version, domain)
    except onnx.defs.SchemaError:
        problems.append(f"{label}: {node.op_type} does not exist at opset {version} of {domain or 'ai.onnx'!r}")


def emit(model: ir.Model, spec: Any, out_dir: Path, options: dict[str, Any] | None = None) -> EmitResult:
    """Write the model; weights go to external data when large or when they already were."""
    options = options or {}
    threshold = int(options.get("external_data_threshold", EXTERNAL_DATA_THRESHOLD))
    extra = _encode_quantized(model, spec, options)
    path = out_dir / MODEL_FILE
    if _needs_external_data(model, threshold):
        ir.save(
            model,
            path,
            external_data=DATA_FILE,
            size_threshold_bytes=EXTERNAL_TENSOR_MIN_BYTES,
            max_workers=1,  # one writer keeps the file layout deterministic
        )
        files = [MODEL_FILE, DATA_FILE]
    else:
        proto = ir.to_proto(model)
        path.write_bytes(proto.SerializeToString(deterministic=True))
        files = [MODEL_FILE]
    return EmitResult(files=files, entry=MODEL_FILE, extra=extra)


def _encode_quantized(model: ir.Model, spec: Any, options: dict[str, Any]) -> dict[str, Any]:
    """int4 weights -> MatMulNBits / GatherBlockQuantized where the target's onnxruntime has them (in place)."""
    from targets.onnx import encode, encode_int8

    extra: dict[str, Any] = {}
    # int8 weight-only reads: Cast+Mul that onnxruntime folds at load, int8 embedding gathers (any onnxruntime)
    int8 = encode_int8.encode_int8_weights(model)
    if int8.folded_weights or int8.gathered_tables:
        extra["int8_encoding"] = int8.to_json()
    if not encode.wants_int4_contrib(spec):
        return extra
    level = int(options.get("int4_accuracy_level", encode.DEFAULT_ACCURACY_LEVEL))
    report = encode.encode_int4(model, accuracy_level=level)
    if report.matmulnbits or report.gather_block_quantized:
        extra["int4_encoding"] = report.to_json()
    return extra


def _needs_external_data(model: ir.Model, threshold: int) -> bool:
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            if isinstance(tensor, ir.ExternalTensor):
                return True
            total += tensor.nbytes
    return total > threshold
