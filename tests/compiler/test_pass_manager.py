"""Pipeline strings, the registry, the PassManager's timing/verification/dumps."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import onnx
import onnx_ir as ir
import pytest

from compiler.errors import KilnError, PassError, VerificationError
from compiler.passes import (
    OPT_LEVELS,
    Fixpoint,
    Pass,
    PassManager,
    PassResult,
    format_pipeline,
    parse_pipeline,
    registry,
)

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 3] x) => (float[2, 3] y) {
    a = Identity(x)
    b = Relu(a)
    c = Relu(a)
    y = Add(b, c)
}
"""


def _model() -> ir.Model:
    return ir.serde.deserialize_model(onnx.parser.parse_model(MODEL))


def test_parse_options_and_round_trip():
    steps = parse_pipeline("fold-constants{size-limit=4096},eliminate-dead , cse")
    assert [s.name for s in steps] == ["fold-constants", "eliminate-dead", "cse"]
    assert steps[0].size_limit == 4096
    assert format_pipeline(steps) == "fold-constants{size-limit=4096},eliminate-dead,cse"
    assert format_pipeline(parse_pipeline(format_pipeline(steps))) == format_pipeline(steps)


def test_parse_fixpoint_group():
    (group,) = parse_pipeline("fixpoint(eliminate-identity,cse){max-iterations=3}")
    assert isinstance(group, Fixpoint) and group.max_iterations == 3
    assert [p.name for p in group.passes] == ["eliminate-identity", "cse"]
    assert group.spec() == "fixpoint(eliminate-identity,cse){max-iterations=3}"


@pytest.mark.parametrize(
    "text, message",
    [
        ("fold-constnts", "did you mean fold-constants"),
        ("cse{nope=1}", "has no option 'nope'"),
        ("fold-constants{size-limit=lots}", "is not a valid int"),
        ("cse,", "expected a pass name"),
        ("fixpoint(cse", "unclosed 'fixpoint('"),
        ("cse{x", "unclosed '{'"),
    ],
)
def test_bad_pipelines_name_the_problem(text, message):
    with pytest.raises(KilnError, match=message.replace("(", r"\(")):
        parse_pipeline(text)


def test_every_opt_level_parses_and_registered_passes_are_kebab_case():
    for pipeline in OPT_LEVELS.values():
        parse_pipeline(pipeline)
    names = set(registry())
    assert {"fold-constants", "eliminate-dead", "cse", "eliminate-identity", "fold-shapes"} <= names


def test_manager_records_each_pass_and_modified():
    model = _model()
    report = PassManager("eliminate-identity,cse,eliminate-dead,cse").run(model)
    assert [r.name for r in report.records] == ["eliminate-identity", "cse", "eliminate-dead", "cse"]
    assert [r.modified for r in report.records][0] is True
    assert report.records[-1].modified is False
    assert all(r.seconds >= 0 for r in report.records)
    assert [n.op_type for n in model.graph] == ["Relu", "Add"]


def test_fixpoint_stops_when_nothing_changes():
    model = _model()
    report = PassManager("fixpoint(eliminate-identity,cse,eliminate-dead)").run(model)
    iterations = {r.iteration for r in report.records}
    assert max(iterations) >= 1  # a second round ran and found nothing
    last_round = [r for r in report.records if r.iteration == max(iterations)]
    assert not any(r.modified for r in last_round)


@dataclasses.dataclass(frozen=True)
class _BreakGraph(Pass):
    name: ClassVar[str] = "break-graph"

    def call(self, model: ir.Model) -> PassResult:
        relu = next(n for n in model.graph if n.op_type == "Relu")
        model.graph.remove(relu)  # leaves Add reading a value nobody produces
        return PassResult(model, True)


@dataclasses.dataclass(frozen=True)
class _Crash(Pass):
    name: ClassVar[str] = "crash"

    def call(self, model: ir.Model) -> PassResult:
        raise ZeroDivisionError("boom")


def test_verifier_names_the_guilty_pass():
    with pytest.raises(PassError) as info:
        PassManager([*parse_pipeline("eliminate-identity"), _BreakGraph()]).run(_model())
    assert "break-graph" in str(info.value) and "not defined before use" in str(info.value)
    assert "eliminate-identity" in info.value.hint


def test_crashing_pass_is_named():
    with pytest.raises(PassError, match="pass 'crash' failed: ZeroDivisionError: boom"):
        PassManager([_Crash()]).run(_model())


def test_invalid_input_is_reported_before_passes():
    model = _model()
    model.graph.outputs[0].type = None
    with pytest.raises(VerificationError, match="before any pass"):
        PassManager("cse").run(model)


def test_dump_ir(tmp_path):
    PassManager("eliminate-identity,cse", dump_ir=tmp_path).run(_model())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000-input.txt", "001-eliminate-identity.txt", "002-cse.txt"]
