"""The quantization scheme registry: name -> frozen dataclass with validated options.

``--quantize w4{block-size=64,symmetric=false}`` parses with the same option
syntax as pass pipelines. Each scheme names the module that implements it;
the implementation is imported only when the scheme is used.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, ClassVar

from compiler.errors import KilnError

CALIBRATION_METHODS = ("minmax", "percentile", "entropy", "mse")


@dataclasses.dataclass(frozen=True)
class Scheme:
    """Base of every scheme. Subclasses set ``name``, ``summary``, ``implementation``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: "module:function" applying the scheme: fn(scheme, ctx) -> list[LayerRecord]
    implementation: ClassVar[str] = ""
    #: whether the scheme cannot run without --calibration data
    needs_calibration: ClassVar[bool] = False
    #: the format the per-layer fallback of the accuracy budget keeps a layer in
    fallback: ClassVar[str] = "float32"

    def validate(self) -> None:
        """Raise ValueError for option values the scheme does not support."""

    def __post_init__(self) -> None:
        try:
            self.validate()
        except ValueError as err:
            raise KilnError(f"--quantize {self.spec()}: {err}") from None

    def options(self) -> dict[str, Any]:
        return {_kebab(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    def spec(self) -> str:
        changed = [
            f"{_kebab(f.name)}={_format(getattr(self, f.name))}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        ]
        return f"{self.name}{{{','.join(changed)}}}" if changed else self.name


def _check_block(block_size: int) -> None:
    if block_size not in (16, 32, 64, 128, 256):
        raise ValueError(f"block-size must be 16, 32, 64, 128 or 256, got {block_size}")


def _check_method(method: str) -> None:
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")


@dataclasses.dataclass(frozen=True)
class WeightOnly8(Scheme):
    name: ClassVar[str] = "w8"
    summary: ClassVar[str] = "weight-only int8, symmetric per output channel"
    implementation: ClassVar[str] = "passes.quantize.weight_only:apply"
    #: also quantize embedding tables (Gather of an initializer)
    embeddings: bool = True

    bits: ClassVar[int] = 8
    block_size: ClassVar[int] = 0
    symmetric: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class WeightOnly4(Scheme):
    name: ClassVar[str] = "w4"
    summary: ClassVar[str] = "weight-only int4 in blocks along the input dimension (round to nearest)"
    implementation: ClassVar[str] = "passes.quantize.weight_only:apply"
    block_size: int = 32
    symmetric: bool = True
    embeddings: bool = True

    bits: ClassVar[int] = 4

    def validate(self) -> None:
        _check_block(self.block_size)


@dataclasses.dataclass(frozen=True)
class Gptq4(WeightOnly4):
    name: ClassVar[str] = "gptq-w4"
    summary: ClassVar[str] = "int4 blocks with GPTQ error compensation (Hessian from calibration activations)"
    implementation: ClassVar[str] = "passes.quantize.gptq:apply"
    needs_calibration: ClassVar[bool] = True
    block_size: int = 128
    #: Hessian dampening, as a fraction of the mean diagonal
    damp: float = 0.01
    #: quantize columns in order of decreasing Hessian diagonal
    act_order: bool = False

    def validate(self) -> None:
        super().validate()
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")


@dataclasses.dataclass(frozen=True)
class Awq4(WeightOnly4):
    name: ClassVar[str] = "awq-w4"
    summary: ClassVar[str] = "int4 blocks with activation-aware per-channel scaling (AWQ)"
    implementation: ClassVar[str] = "passes.quantize.awq:apply"
    needs_calibration: ClassVar[bool] = True
    block_size: int = 128
    #: grid points searched for the scaling exponent in [0, 1)
    grid: int = 20

    def validate(self) -> None:
        super().validate()
        if not 2 <= self.grid <= 100:
            raise ValueError(f"grid must be between 2 and 100, got {self.grid}")


@dataclasses.dataclass(frozen=True)
class StaticInt8(Scheme):
    name: ClassVar[str] = "int8"
    summary: ClassVar[str] = "static W8A8: int8 per-channel weights, uint8 activations calibrated per tensor"
    implementation: ClassVar[str] = "passes.quantize.static_int8:apply"
    needs_calibration: ClassVar[bool] = True
    #: percentile: on EfficientNet-Lite0 minmax lost 2-3 points of top-1 agreement (bench/_quant_effnet.py)
    method: str = "percentile"
    #: percentile kept by method=percentile
    percentile: float = 99.999

    def validate(self) -> None:
        _check_method(self.method)
        if not 90 <= self.percentile <= 100:
            raise ValueError(f"percentile must be in [90, 100], got {self.percentile}")


@dataclasses.dataclass(frozen=True)
class DynamicInt8(Scheme):
    name: ClassVar[str] = "int8-dynamic"
    summary: ClassVar[str] = "int8 weights per channel, activations quantized at run time"
    implementation: ClassVar[str] = "passes.quantize.dynamic_int8:apply"
    #: also store embedding tables (Gather of an initializer) as int8 (weight-only, per row)
    embeddings: bool = True


@dataclasses.dataclass(frozen=True)
class Float16(Scheme):
    name: ClassVar[str] = "fp16"
    summary: ClassVar[str] = "float16 weights and compute, float32 islands where values overflow float16"
    implementation: ClassVar[str] = "passes.quantize.float16:apply"
    #: keep ops whose calibrated |values| exceed this fraction of the format's max in float32
    overflow_margin: float = 0.5

    dtype: ClassVar[str] = "float16"

    def validate(self) -> None:
        if not 0 < self.overflow_margin <= 1:
            raise ValueError(f"overflow-margin must be in (0, 1], got {self.overflow_margin}")


@dataclasses.dataclass(frozen=True)
class BFloat16(Float16):
    name: ClassVar[str] = "bf16"
    summary: ClassVar[str] = "bfloat16 weights and compute, float32 islands where precision is lost"
    dtype: ClassVar[str] = "bfloat16"


SCHEMES: dict[str, type[Scheme]] = {
    cls.name: cls for cls in (WeightOnly8, WeightOnly4, StaticInt8, DynamicInt8, Float16, BFloat16, Gptq4, Awq4)
}


@dataclasses.dataclass(frozen=True)
class GgufQuant(Scheme):
    """A llama.cpp file type (``q4_k_m``...): for --emit gguf, which encodes it byte-identically to
    llama-quantize. The scheme only carries the choice; there is nothing to rewrite in an ONNX graph."""

    implementation: ClassVar[str] = "targets.gguf.scheme:apply"
    gguf: ClassVar[bool] = True
    #: every quantizable tensor in this type, without llama.cpp's per-tensor mix (llama-quantize --pure)
    pure: bool = False
    #: importance matrix: a llama.cpp imatrix file (.gguf or legacy .dat)
    imatrix: str = ""


GGUF_TYPES = {
    "f32": "float32 GGUF", "q8_0": "8-bit blocks of 32", "q4_0": "4-bit blocks of 32", "q4_1": "4-bit + min, blocks of 32",
    "q5_0": "5-bit blocks of 32", "q5_1": "5-bit + min, blocks of 32", "q2_k": "llama.cpp Q2_K mix",
    "q3_k_s": "llama.cpp Q3_K_S", "q3_k_m": "llama.cpp Q3_K_M", "q3_k_l": "llama.cpp Q3_K_L",
    "q4_k_s": "llama.cpp Q4_K_S", "q4_k_m": "llama.cpp Q4_K_M", "q5_k_s": "llama.cpp Q5_K_S",
    "q5_k_m": "llama.cpp Q5_K_M", "q6_k": "llama.cpp Q6_K", "q3_k": "= q3_k_m", "q4_k": "= q4_k_m", "q5_k": "= q5_k_m",
}
SCHEMES.update({
    name: dataclasses.dataclass(frozen=True)(
        type(f"Gguf_{name}", (GgufQuant,), {"name": name, "summary": f"GGUF (--emit gguf): {summary}"}))
    for name, summary in GGUF_TYPES.items()
})


def parse_scheme(text: str) -> Scheme:
    """``w4`` or ``w4{block-size=64,symmetric=false}`` -> a validated Scheme."""
    m = re.fullmatch(r"\s*([a-z0-9_-]+)\s*(?:\{(.*)\})?\s*", text or "")
    if not m:
        raise KilnError(f"--quantize {text!r}: expected NAME or NAME{{option=value,...}}",
                        hint=f"schemes: {', '.join(SCHEMES)}")
    name, body = m.group(1), m.group(2)
    cls = SCHEMES.get(name)
    if cls is None:
        import difflib

        close = difflib.get_close_matches(name, SCHEMES, n=2)
        raise KilnError(f"--quantize: unknown scheme {name!r}" + (f" (did you mean {' or '.join(close)}?)" if close else ""),
                        hint=f"schemes: {', '.join(SCHEMES)}")
    fields = {_kebab(f.name): f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in (body or "").split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or key not in fields:
            known = ", ".join(fields) or "none"
            raise KilnError(f"--quantize {name}: unknown option {key!r}", hint=f"options of {name}: {known}")
        field = fields[key]
        kwargs[field.name] = _convert(raw.strip(), hints[field.name], f"--quantize {name}: option {key}")
    return cls(**kwargs)


def scheme_table() -> list[dict[str, Any]]:
    """Every scheme with its summary and options (for `kiln passes` and docs)."""
    return [
        {"name": n, "summary": c.summary, "calibration": c.needs_calibration,
         "options": {_kebab(f.name): f.default for f in dataclasses.fields(c)}}
        for n, c in SCHEMES.items()
    ]


def _convert(raw: str, kind: Any, where: str) -> Any:
    try:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return kind(raw)
    except ValueError:
        raise KilnError(f"{where}: {raw!r} is not a {getattr(kind, '__name__', kind)}") from None


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _format(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclasses.dataclass(frozen=True)
class MlcQuant(Scheme):
    """An MLC-LLM quantization mode (``q4f16_1``...): for --emit mlc, which encodes LLM checkpoints in
    MLC's layout (int4 in uint32 words, groups of 32). On an ONNX graph the mode maps to kiln's own
    schemes (``targets.mlc.scheme``): q0f32 nothing, q0f16 fp16, q4f16_1/q4f32_1 w4{block-size=32}."""

    implementation: ClassVar[str] = "targets.mlc.scheme:apply"
    mlc: ClassVar[bool] = True


MLC_MODES = {
    "q0f32": "MLC (--emit mlc): float32 weights and compute",
    "q0f16": "MLC (--emit mlc): float16 weights and compute",
    "q4f16_1": "MLC (--emit mlc): int4 groups of 32 packed in uint32, float16 scales and compute",
    "q4f32_1": "MLC (--emit mlc): int4 groups of 32 packed in uint32, float32 scales and compute",
}
SCHEMES.update({
    name: dataclasses.dataclass(frozen=True)(
        type(f"Mlc_{name}", (MlcQuant,), {"name": name, "summary": summary}))
    for name, summary in MLC_MODES.items()
})
