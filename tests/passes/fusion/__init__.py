"""Helpers for the fusion pass tests (importing this registers the fusion passes)."""

from __future__ import annotations

import numpy as np

import passes.fusion  # noqa: F401  (registers the fusion passes)
from compiler.ir.verifier import verify_model
from compiler.passes import parse_pipeline
from tests.helpers import (
    assert_same_outputs,
    assert_unique_names,
    io_signature,
    model_from_text,
    run_passes,
    snapshot,
)

#: Fusions reassociate float arithmetic; the issue's tolerance.
RTOL, ATOL = 1e-3, 1e-4

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def fuse(text: str, pipeline: str, *, feeds=None, compare: bool = True):
    """Parse, run ``pipeline`` (verified after each pass), check the signature,
    unique names and (when ``compare``) the outputs against the original."""
    model = model_from_text(text)
    before = snapshot(model)
    signature = io_signature(model)
    report = run_passes(model, pipeline)
    verify_model(model)
    assert io_signature(model) == signature, "graph inputs/outputs changed"
    assert_unique_names(model)
    if compare:
        assert_same_outputs(before, model, feeds, rtol=RTOL, atol=ATOL)
    return model, report


def rule_report(text: str, spec: str):
    """Run one pass (a pipeline string of one pass) and return its RuleReport and the model."""
    (step,) = parse_pipeline(spec)
    model = model_from_text(text)
    report = step.run(model)
    verify_model(model)
    return report, model


def refused(text: str, spec: str) -> list[str]:
    """The reasons ``spec`` gives for not firing; asserts it changed nothing."""
    report, _ = rule_report(text, spec)
    assert not report.modified, f"{spec} fired: {report.fired}"
    return report.reasons()


_RNG = np.random.default_rng(1234)


def const(name: str, shape: list[int] | tuple[int, ...], *, positive: bool = False, dtype: str = "float", values=None) -> str:
    """An initializer in ONNX text syntax with seeded random (or given) values."""
    if values is None:
        size = int(np.prod(shape)) if shape else 1
        values = _RNG.uniform(0.5, 1.5, size) if positive else _RNG.standard_normal(size)
    flat = np.asarray(values).reshape(-1)
    body = ", ".join(repr(int(v)) if dtype.startswith("int") else f"{float(v):.6g}" for v in flat)
    dims = f"[{','.join(str(d) for d in shape)}]" if len(shape) else ""
    return f"{dtype}{dims} {name} = {{{body}}}"


def model_text(inputs: str, outputs: str, inits: list[str], body: str, header: str = HEADER) -> str:
    init = f"<{', '.join(inits)}>" if inits else ""
    return f"""{header}
    g ({inputs}) => ({outputs}) {init} {{
    {body}
    }}"""
