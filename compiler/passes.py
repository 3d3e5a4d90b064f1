"""Pass infrastructure: Pass, PassResult, the pass registry, pipeline strings, PassManager.

A pass is a frozen dataclass with a kebab-case ``name`` and its options as
fields. It subclasses onnx_ir's ``InPlacePass`` so kiln passes also run inside
onnx_ir's own pass managers.

Pipeline strings::

    fold-constants{size-limit=65536},eliminate-dead,cse
    fixpoint(eliminate-identity,fold-constants,eliminate-dead){max-iterations=4}

``fixpoint(...)`` repeats its passes until none of them reports ``modified``.
``-O0`` .. ``-O3`` are named pipelines (see ``OPT_LEVELS``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import re
import time
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import onnx_ir as ir

from compiler.errors import KilnError, PassError, VerificationError

PassResult = ir.passes.PassResult


@dataclasses.dataclass(frozen=True)
class Pass(ir.passes.InPlacePass):
    """Base class of every kiln pass: a frozen dataclass, options as fields."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    def call(self, model: ir.Model) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return {_kebab(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    def spec(self) -> str:
        """The pipeline-string form of this pass with its non-default options."""
        changed = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.default is not dataclasses.MISSING and value == f.default:
                continue
            changed.append(f"{_kebab(f.name)}={_format_value(value)}")
        return f"{self.name}{{{','.join(changed)}}}" if changed else self.name


_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator that adds a pass to the registry under its ``name``."""
    if not cls.name or not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", cls.name):
        raise ValueError(f"pass name {cls.name!r} is not kebab-case")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"two passes are named {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Pass]]:
    """Every registered pass by name (importing the ``passes`` package registers them)."""
    import passes  # noqa: F401  (registers the built-in passes)

    return dict(sorted(_REGISTRY.items()))


def pass_options(cls: type[Pass]) -> list[tuple[str, str, Any]]:
    """(option name, type name, default) for each option of a pass class."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append((_kebab(f.name), _type_name(hints.get(f.name, str)), default))
    return out


# ---------------------------------------------------------------- pipelines


@dataclasses.dataclass(frozen=True)
class Fixpoint:
    """A group of passes repeated until none reports ``modified``."""

    passes: tuple[Pass | Fixpoint, ...]
    max_iterations: int = 8

    name: ClassVar[str] = "fixpoint"

    def spec(self) -> str:
        inner = ",".join(p.spec() for p in self.passes)
        opts = "" if self.max_iterations == 8 else f"{{max-iterations={self.max_iterations}}}"
        return f"fixpoint({inner}){opts}"


Step = Pass | Fixpoint

_CLEANUP = "eliminate-identity,fold-shapes,fold-constants,cse,eliminate-dead"
#: Fusions that emit standard ONNX ops only (any runtime, any backend).
_FUSE_STANDARD = (
    "simplify-reshape-shape,simplify-shape-math,"
    "fuse-pad,fuse-batchnorm,fold-scale-into-weights,fuse-bias,fuse-matmul-add,"
    "simplify-layout,simplify-concat-slice,fuse-layer-norm,fuse-rms-norm,fuse-gelu,fuse-attention"
)
#: onnxruntime contrib forms of norms and activations. They run before the
#: standard fusions: fold-scale-into-weights would otherwise move GELU's 0.5
#: into the next MatMul and break the pattern (and onnxruntime's BiasGelu).
_FUSE_CONTRIB_EARLY = (
    "fuse-layer-norm{contrib=true},fuse-rms-norm{contrib=true},"
    "fuse-gelu{contrib=true},fuse-silu{contrib=true}"
)
#: Contrib fusions that need the standard ones first (BatchNorm folded into the
#: Conv before FusedConv); {gpu} picks the forms that only pay off on a GPU.
_FUSE_CONTRIB_LATE = (
    "fuse-skip-norm{{contrib=true,gpu={gpu}}},fuse-attention{{contrib=true,gpu={gpu}}},"
    "fuse-conv-activation{{contrib=true}}"
)


def opt_level_pipeline(level: int, *, contrib: bool = False, gpu: bool = False) -> str:
    """The named pipeline of -O``level``.

    -O1 cleans up once; -O2 iterates cleanup and standard-op fusions to a fixed
    point; -O3 adds the runtime-specific fusions when the target's runtime has
    onnxruntime's contrib ops (``contrib``), in their GPU forms when ``gpu``.
    """
    if level == 0:
        return ""
    if level == 1:
        return f"infer-types,{_CLEANUP}"
    if level == 2 or (level == 3 and not contrib):
        return f"infer-types,fixpoint({_CLEANUP},{_FUSE_STANDARD})"
    if level == 3:
        late = _FUSE_CONTRIB_LATE.format(gpu="true" if gpu else "false")
        return (
            f"infer-types,fixpoint({_CLEANUP}),{_FUSE_CONTRIB_EARLY},"
            f"fixpoint({_CLEANUP},{_FUSE_STANDARD}),{late},fixpoint({_CLEANUP})"
        )
    raise KilnError(f"unknown optimization level -O{level}", hint="use -O0, -O1, -O2 or -O3")


#: The -O pipelines for a CPU target whose runtime has contrib ops (``kiln passes`` shows these).
OPT_LEVELS: dict[int, str] = {level: opt_level_pipeline(level, contrib=True) for level in range(4)}


def parse_pipeline(text: str) -> list[Step]:
    """Parse a pipeline string into pass instances; raise KilnError naming the bad part."""
    parser = _PipelineParser(text)
    steps = parser.parse()
    return steps


class _PipelineParser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str) -> KilnError:
        return KilnError(
            f"bad pass pipeline at column {self.pos + 1}: {message}: {self.text!r}",
            hint="run `kiln passes` to list passes and their options",
        )

    def parse(self) -> list[Step]:
        self.skip_ws()
        if self.pos >= len(self.text):
            return []
        steps = self.parse_list()
        self.skip_ws()
        if self.pos != len(self.text):
            raise self.error(f"unexpected {self.text[self.pos]!r}")
        return steps

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def parse_list(self) -> list[Step]:
        steps = [self.parse_step()]
        while True:
            self.skip_ws()
            if self.pos < len(self.text) and self.text[self.pos] == ",":
                self.pos += 1
                steps.append(self.parse_step())
            else:
                return steps

    def parse_name(self) -> str:
        self.skip_ws()
        m = re.compile(r"[A-Za-z0-9_-]+").match(self.text, self.pos)
        if not m:
            raise self.error("expected a pass name")
        self.pos = m.end()
        return m.group(0)

    def parse_options(self) -> dict[str, str]:
        self.skip_ws()
        if self.pos >= len(self.text) or self.text[self.pos] != "{":
            return {}
        end = self.text.find("}", self.pos)
        if end < 0:
            raise self.error("unclosed '{'")
        body = self.text[self.pos + 1 : end]
        self.pos = end + 1
        options: dict[str, str] = {}
        for item in filter(None, (s.strip() for s in body.split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise self.error(f"option {item!r} needs a value (key=value)")
            options[key.strip()] = value.strip()
        return options

    def parse_step(self) -> Step:
        start = self.pos
        name = self.parse_name()
        self.skip_ws()
        if name == "fixpoint":
            if self.pos >= len(self.text) or self.text[self.pos] != "(":
                raise self.error("fixpoint needs a parenthesized list of passes")
            self.pos += 1
            inner = self.parse_list()
            self.skip_ws()
            if self.pos >= len(self.text) or self.text[self.pos] != ")":
                raise self.error("unclosed 'fixpoint('")
            self.pos += 1
            opts = self.parse_options()
            unknown = set(opts) - {"max-iterations"}
            if unknown:
                raise self.error(f"fixpoint has no option {sorted(unknown)[0]!r}")
            iterations = _convert(opts.get("max-iterations", "8"), int, "max-iterations", "fixpoint")
            return Fixpoint(tuple(inner), iterations)
        options = self.parse_options()
        passes = registry()
        if name not in passes:
            import difflib

            close = difflib.get_close_matches(name, list(passes), n=3)
            self.pos = start
            raise self.error(
                f"unknown pass {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
            )
        return instantiate(passes[name], options)


def instantiate(cls: type[Pass], options: dict[str, str]) -> Pass:
    """Build a pass from string options, converting each by its field's type."""
    hints = typing.get_type_hints(cls)
    fields = {_kebab(f.name): f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, raw in options.items():
        field = fields.get(key) or fields.get(_kebab(key))
        if field is None:
            known = ", ".join(fields) or "none"
            raise KilnError(f"pass {cls.name!r} has no option {key!r} (options: {known})")
        kwargs[field.name] = _convert(raw, hints.get(field.name, str), key, cls.name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise KilnError(f"bad options for pass {cls.name!r}: {err}") from None


def _convert(raw: str, typ: Any, key: str, pass_name: str) -> Any:
    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if typ is int:
            return int(raw.replace("_", ""), 0)
        if typ is float:
            return float(raw)
        if typing.get_origin(typ) is typing.Literal:
            if raw not in typing.get_args(typ):
                raise ValueError(raw)
            return raw
        return raw
    except ValueError:
        raise KilnError(
            f"option {key}={raw!r} of pass {pass_name!r} is not a valid {_type_name(typ)}"
        ) from None


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _type_name(typ: Any) -> str:
    if typing.get_origin(typ) is typing.Literal:
        return "|".join(map(str, typing.get_args(typ)))
    return getattr(typ, "__name__", str(typ))


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def format_pipeline(steps: Sequence[Step]) -> str:
    return ",".join(s.spec() for s in steps)


# ---------------------------------------------------------------- manager


@contextlib.contextmanager
def paused_gc():
    """Pause the cyclic garbage collector while passes run.

    Nodes and values reference each other, so passes allocate many objects in
    cycles; full collections triggered midway scan the whole heap and make a
    pass's time grow faster than the graph. Collection resumes afterwards.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclasses.dataclass
class PassRecord:
    """What one pass run did: for the manifest and `--verbose` timings."""

    name: str
    spec: str
    seconds: float
    modified: bool
    iteration: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"pass": self.spec, "modified": self.modified, "iteration": self.iteration}


@dataclasses.dataclass
class PipelineReport:
    pipeline: str
    records: list[PassRecord] = dataclasses.field(default_factory=list)

    @property
    def modified(self) -> bool:
        return any(r.modified for r in self.records)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.records)


class PassManager:
    """Runs a pipeline: times each pass, verifies after each, optionally dumps IR.

    The verifier runs after every pass; when it fails, the PassError names the
    guilty pass and the pipeline that ran before it.
    """

    def __init__(
        self,
        steps: Sequence[Step] | str,
        *,
        verify: bool = True,
        dump_ir: str | Path | None = None,
        on_pass: Callable[[PassRecord], None] | None = None,
    ) -> None:
        self.steps = parse_pipeline(steps) if isinstance(steps, str) else list(steps)
        self.verify = verify
        self.dump_dir = Path(dump_ir) if dump_ir is not None else None
        self.on_pass = on_pass
        self._dump_count = 0

    @property
    def pipeline(self) -> str:
        return format_pipeline(self.steps)

    def run(self, model: ir.Model) -> PipelineReport:
        from compiler.ir.verifier import verify_model

        report = PipelineReport(self.pipeline)
        if self.verify:
            try:
                verify_model(model)
            except VerificationError as err:
                raise VerificationError(f"the model is invalid before any pass ran: {err}") from None
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            self._dump(model, "input")
        with paused_gc():
            self._run_steps(self.steps, model, report, iteration=0)
        return report

    def _run_steps(
        self, steps: Iterable[Step], model: ir.Model, report: PipelineReport, iteration: int
    ) -> bool:
        modified = False
        for step in steps:
            if isinstance(step, Fixpoint):
                for i in range(step.max_iterations):
                    if not self._run_steps(step.passes, model, report, iteration=i):
                        break
                    modified = True
                continue
            modified |= self._run_pass(step, model, report, iteration)
        return modified

    def _run_pass(self, p: Pass, model: ir.Model, report: PipelineReport, iteration: int) -> bool:
        from compiler.ir.verifier import verify_model

        so_far = ",".join(r.spec for r in report.records)
        start = time.perf_counter()
        try:
            result = p.call(model)
        except KilnError:
            raise
        except Exception as err:  # a bug in the pass: report it with the pass named
            raise PassError(
                f"pass {p.spec()!r} failed: {type(err).__name__}: {err}",
                hint=f"pipeline before it: {so_far or '(none)'}; rerun with --debug for a traceback",
            ) from err
        seconds = time.perf_counter() - start
        if result.model is not model:
            raise PassError(f"pass {p.spec()!r} returned a different model; passes edit in place")
        record = PassRecord(p.name, p.spec(), seconds, bool(result.modified), iteration)
        report.records.append(record)
        if self.verify:
            try:
                verify_model(model)
            except VerificationError as err:
                raise PassError(
                    f"pass {p.spec()!r} left an invalid graph: {err}",
                    hint=f"pipeline before it: {so_far or '(none)'}",
                ) from None
        if self.dump_dir is not None:
            self._dump(model, p.name)
        if self.on_pass is not None:
            self.on_pass(record)
        return record.modified

    def _dump(self, model: ir.Model, label: str) -> None:
        assert self.dump_dir is not None
        path = self.dump_dir / f"{self._dump_count:03d}-{label}.txt"
        self._dump_count += 1
        path.write_text(str(model), encoding="utf-8")
