"""`kiln inspect`: signature, op histogram, parameters by dtype, opsets."""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from compiler.signature import dtype_name, signature


def summarize(model: ir.Model) -> dict[str, Any]:
    ops: collections.Counter[str] = collections.Counter()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        ops[f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
    params: dict[str, dict[str, int]] = {}
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            entry = params.setdefault(dtype_name(tensor.dtype), {"count": 0, "elements": 0, "bytes": 0})
            entry["count"] += 1
            entry["elements"] += int(np.prod(tensor.shape.numpy())) if tensor.shape is not None else 0
            entry["bytes"] += int(tensor.nbytes)
    return {
        "ir_version": model.ir_version,
        "producer": " ".join(filter(None, [model.producer_name, model.producer_version])) or None,
        "opsets": {(k or "ai.onnx"): v for k, v in sorted(model.opset_imports.items())},
        "signature": signature(model),
        "nodes": sum(ops.values()),
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "parameters": dict(sorted(params.items())),
        "functions": sorted(f"{f.domain}::{f.name}" for f in model.functions.values()),
    }


def format_summary(info: dict[str, Any], title: str) -> str:
    lines = [title]
    if "artifact" in info:
        a = info["artifact"]
        lines.append(f"  artifact: emit={a['emit']} target={a['target']} kiln={a['kiln_version']}")
        lines.append(f"  pipeline: {a['pipeline'] or '(none)'}")
        for f in a["files"]:
            lines.append(f"    {f['path']}  {_bytes(f['bytes'])}  sha256 {f['sha256'][:16]}…")
    if "quantization" in info.get("artifact", {}):
        q = info["artifact"]["quantization"]
        figures = ", ".join(f"{k} {v}" for k, v in (q.get("metrics") or {}).items())
        lines.append(f"  quantized: {q['scheme']}, size ratio {q.get('size_ratio')}" + (f", {figures}" if figures else ""))
    if "ir_version" not in info:  # a non-ONNX artifact (tvm, gguf, mlc): the manifest is what there is to show
        _signature_lines(lines, info.get("signature"))
        return "\n".join(lines)
    lines.append(f"  ir_version {info['ir_version']}, opsets: " + ", ".join(f"{k} {v}" for k, v in info["opsets"].items()))
    if info.get("producer"):
        lines.append(f"  producer: {info['producer']}")
    _signature_lines(lines, info["signature"])
    total = sum(p["elements"] for p in info["parameters"].values())
    total_bytes = sum(p["bytes"] for p in info["parameters"].values())
    lines.append(f"  parameters: {total:,} in {sum(p['count'] for p in info['parameters'].values())} tensors, {_bytes(total_bytes)}")
    for dtype, p in info["parameters"].items():
        lines.append(f"    {dtype:<10} {p['elements']:>14,} elements  {_bytes(p['bytes']):>10}  ({p['count']} tensors)")
    lines.append(f"  nodes: {info['nodes']}")
    for op, n in info["ops"].items():
        lines.append(f"    {op:<28} {n}")
    if info["functions"]:
        lines.append("  functions: " + ", ".join(info["functions"]))
    return "\n".join(lines)


def _signature_lines(lines: list[str], sig: dict[str, Any] | None) -> None:
    if not sig:
        return
    for kind in ("inputs", "outputs"):
        lines.append(f"  {kind}:")
        for e in sig.get(kind, []):
            lines.append(f"    {e['name']}: {e['dtype']} {_shape(e.get('shape'))}")


def inspect_path(path: Path) -> tuple[dict[str, Any], str]:
    """Summarize a model file or an artifact folder; returns (info, title)."""
    from compiler.artifact import MANIFEST, read_manifest
    from compiler.importers.onnx_file import import_onnx

    if path.is_dir():
        manifest = read_manifest(path)
        model_path = path / manifest["entry"]
        model, _ = import_onnx(model_path) if manifest["emit"] == "onnx" else (None, None)
        info = summarize(model) if model is not None else {"signature": manifest.get("signature")}
        info["artifact"] = {
            "emit": manifest["emit"],
            "target": manifest["target"]["name"],
            "kiln_version": manifest["kiln_version"],
            "pipeline": manifest.get("pipeline", {}).get("spec", ""),
            "files": manifest["files"],
            "manifest": MANIFEST,
            **({"quantization": manifest["quantization"]} if "quantization" in manifest else {}),
        }
        return info, f"{path} (kiln artifact)"
    model, digest = import_onnx(path)
    info = summarize(model)
    info["sha256"] = digest
    return info, str(path)


def to_json(info: dict[str, Any]) -> str:
    return json.dumps(info, indent=2, sort_keys=False)


def _shape(shape: list | None) -> str:
    return "[?]" if shape is None else "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
