"""Target triples, target specs and presets.

A target is an LLVM-style triple (``aarch64-linux-android``) plus a device
(``cpu``, ``cuda:sm_90``, ``opencl:adreno``...), or a named preset
(``raspberry-pi-5``) that fixes the triple, the CPU tuning and the devices.
What a target supports is data, not code: ``targets/specs/<triple>.json``
per base triple and ``targets/specs/presets.json``. This module parses
triples, loads and validates that data once, and resolves
``(target, device)`` to a `TargetSpec`.

Presets and ``--device``: a preset names the devices its machine has, the
first being the default. ``--device`` may pick another one of those (CPU
tuning kept), must agree with an arch the preset fixes (``jetson-orin`` is
``cuda:sm_87``), and anything else is a `TargetError` whose hint names the
bare triple to use instead.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import os
import re
import shutil
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from compiler.errors import TargetError

__all__ = [
    "DEVICES",
    "EMIT_FORMATS",
    "Triple",
    "TargetSpec",
    "find_compiler",
    "format_targets_table",
    "known_presets",
    "known_triples",
    "list_targets",
    "parse_device",
    "parse_triple",
    "resolve_target",
    "suggest",
]

# ---------------------------------------------------------------- vocabulary

DEVICES = ("cpu", "cuda", "opencl", "vulkan", "metal", "webgpu")
EMIT_FORMATS = ("onnx", "tvm", "mlc", "gguf")
DTYPES = ("float32", "float16", "bfloat16", "int8", "uint8", "int4", "uint4")
QUANT_ENCODINGS = ("qdq", "qoperator", "matmulnbits", "gguf", "tvm-packed")

#: which emit formats can carry a quantization encoding at all
_ENCODING_NEEDS_EMIT = {
    "qdq": {"onnx"},
    "qoperator": {"onnx"},
    "matmulnbits": {"onnx"},
    "gguf": {"gguf"},
    "tvm-packed": {"tvm", "mlc"},
}

_ARCH_ALIASES = {
    "x86_64": "x86_64", "amd64": "x86_64", "x64": "x86_64",
    "aarch64": "aarch64", "arm64": "aarch64",
    "armv7a": "armv7a", "armv7": "armv7a", "armv7l": "armv7a", "armhf": "armv7a", "arm": "armv7a",
    "riscv64": "riscv64", "riscv64gc": "riscv64",
    "wasm32": "wasm32", "wasm": "wasm32",
}  # fmt: skip
#: dashed spellings rewritten before splitting on "-"
_DASHED_ARCHES = {"x86-64": "x86_64", "armv7-a": "armv7a"}
_OS_ALIASES = {
    "linux": "linux", "android": "android",
    "darwin": "darwin", "macos": "darwin", "macosx": "darwin", "osx": "darwin",
    "ios": "ios", "windows": "windows", "win32": "windows",
    "unknown": "unknown",
}  # fmt: skip
_VENDORS = ("unknown", "pc", "apple")
_DEFAULT_VENDOR = {"darwin": "apple", "ios": "apple", "windows": "pc"}
_ALLOWED_VENDORS = {
    "linux": ("unknown", "pc"),
    "darwin": ("apple",),
    "ios": ("apple",),
    "windows": ("pc", "unknown"),
    "unknown": ("unknown",),
}
_ANDROID_ENV = re.compile(r"android(?:eabi)?(\d*)")
_MIN_ANDROID_API = 21  # the lowest API level current NDKs build for

#: where each device kind exists at all, and why (used for the error message)
_DEVICE_PLATFORMS: dict[str, tuple[tuple[str, ...], str]] = {
    "cpu": (("linux", "android", "darwin", "ios", "windows", "wasm"), ""),
    "cuda": (("linux", "windows"), "CUDA needs an NVIDIA GPU under Linux or Windows"),
    "opencl": (("linux", "android", "windows"), "OpenCL is for Linux, Android and Windows GPUs (Apple platforms use metal)"),
    "vulkan": (("linux", "android", "windows"), "Vulkan is for Linux, Android and Windows GPUs (Apple platforms use metal)"),
    "metal": (("darwin", "ios"), "Metal is Apple's GPU API (arm64-apple-darwin, arm64-apple-ios)"),
    "webgpu": (("wasm",), "WebGPU is the browser's GPU API (wasm32-unknown-unknown)"),
}  # fmt: skip
_OPENCL_ARCHES = ("adreno", "mali")  # TVM's opencl "device" attribute
_CUDA_ARCH = re.compile(r"sm_(\d{2,3})([af]?)")
_CUDA_ARCH_INPUT = re.compile(r"(?:sm_?)?(\d{2,3})([af]?)")
_MIN_CUDA_SM = 50

# ------------------------------------------------------------------ triples


@dataclass(frozen=True)
class Triple:
    """A normalized target triple. Android is LLVM's way: os ``linux``, env ``android[API]``."""

    arch: str
    vendor: str
    os: str
    env: str = ""

    def __str__(self) -> str:
        # The vendor is spelled only where it says something (apple, pc) or
        # where LLVM always writes it (wasm32-unknown-unknown).
        parts = [self.arch]
        if self.vendor != "unknown" or self.os == "unknown":
            parts.append(self.vendor)
        parts.append(self.os)
        if self.env:
            parts.append(self.env)
        return "-".join(parts)

    @property
    def is_android(self) -> bool:
        return self.env.startswith("android")

    @property
    def is_apple(self) -> bool:
        return self.vendor == "apple"

    @property
    def android_api(self) -> int | None:
        """The API level spelled in the triple (``aarch64-linux-android29`` -> 29), else None."""
        m = _ANDROID_ENV.fullmatch(self.env) if self.is_android else None
        return int(m.group(1)) if m and m.group(1) else None

    @property
    def platform(self) -> str:
        """One of linux, android, darwin, ios, windows, wasm."""
        if self.is_android:
            return "android"
        if self.arch == "wasm32":
            return "wasm"
        return self.os

    @property
    def base(self) -> Triple:
        """The triple without an Android API level: the key of its spec file."""
        if self.android_api is None:
            return self
        return Triple(self.arch, self.vendor, self.os, self.env.rstrip("0123456789"))


class _BadPart(Exception):
    """Internal: which dash-separated part of a triple is wrong, and what would fit there."""

    def __init__(self, index: int | None, reason: str, fits: Collection[str] = ()) -> None:
        super().__init__(reason)
        self.index = index
        self.reason = reason
        self.fits = tuple(fits)


def _split(text: str) -> list[str]:
    t = text.strip().lower()
    for dashed, arch in _DASHED_ARCHES.items():
        if t == dashed or t.startswith(dashed + "-"):
            t = arch + t[len(dashed) :]
    return t.split("-") if t else []


def _parse_parts(parts: list[str]) -> Triple:
    n = len(parts)
    if not 2 <= n <= 4 or "" in parts:
        raise _BadPart(None, "expected arch-vendor-os[-env] or arch-os[-env]")
    arch = _ARCH_ALIASES.get(parts[0])
    if arch is None:
        raise _BadPart(0, f"architecture {parts[0]!r} is not known", _ARCH_ALIASES)

    # Which part is which: 4 parts are arch-vendor-os-env; 3 parts are
    # arch-vendor-os when the second is a vendor, else arch-os-env.
    vi: int | None
    ei: int | None
    if n == 4:
        vi, oi, ei = 1, 2, 3
    elif n == 3:
        if parts[1] in _VENDORS or (parts[1] not in _OS_ALIASES and parts[2] in _OS_ALIASES):
            vi, oi, ei = 1, 2, None
        else:
            vi, oi, ei = None, 1, 2
    else:
        vi, oi, ei = None, 1, None

    os_name = _OS_ALIASES.get(parts[oi])
    if os_name is None:
        raise _BadPart(oi, f"OS {parts[oi]!r} is not known", _OS_ALIASES)
    env = parts[ei] if ei is not None else ""
    if os_name == "android":  # "aarch64-android" is shorthand for aarch64-linux-android
        if env:
            raise _BadPart(ei, f"environment {env!r} after OS 'android'; write {parts[0]}-linux-android")
        os_name, env = "linux", "android"

    if vi is None:
        vendor = _DEFAULT_VENDOR.get(os_name, "unknown")
    else:
        word = parts[vi]
        if word not in _VENDORS:
            raise _BadPart(vi, f"vendor {word!r} is not known", _VENDORS)
        if word not in _ALLOWED_VENDORS[os_name]:
            raise _BadPart(vi, f"vendor {word!r} does not go with OS {os_name!r}", _ALLOWED_VENDORS[os_name])
        vendor = _DEFAULT_VENDOR.get(os_name, "unknown")  # pc-linux == unknown-linux, unknown-windows == pc-windows

    if (arch == "wasm32") != (os_name == "unknown"):
        if arch == "wasm32":
            raise _BadPart(oi, f"wasm32 has no OS {os_name!r}: it is wasm32-unknown-unknown", ("unknown",))
        raise _BadPart(oi, f"OS 'unknown' is only for wasm32, not {arch}", ("linux",))
    if os_name in ("darwin", "ios") and arch not in ("aarch64", "x86_64"):
        raise _BadPart(0, f"{arch} does not run {os_name}", ("arm64",))
    if os_name == "ios" and arch != "aarch64":
        raise _BadPart(0, "iOS devices are arm64", ("arm64",))
    if os_name == "windows" and arch not in ("aarch64", "x86_64"):
        raise _BadPart(0, f"{arch} does not run windows", ("x86_64",))
    if arch == "aarch64" and vendor == "apple":
        arch = "arm64"  # Apple's (and LLVM's Darwin) spelling

    env = _normalize_env(arch, os_name, env, ei)
    return Triple(arch, vendor, os_name, env)


def _normalize_env(arch: str, os_name: str, env: str, ei: int | None) -> str:
    if os_name == "linux":
        m = _ANDROID_ENV.fullmatch(env)
        if m:
            api = m.group(1)
            if api and int(api) < _MIN_ANDROID_API:
                raise _BadPart(ei, f"Android API level {api} is below {_MIN_ANDROID_API}, the lowest the NDK supports")
            return ("androideabi" if arch == "armv7a" else "android") + api
        fits = ("gnueabihf", "musleabihf") if arch == "armv7a" else ("gnu", "musl")
        if not env:
            return fits[0]
        if env not in fits:
            why = " (32-bit Arm Linux is hard-float: gnueabihf)" if arch == "armv7a" else ""
            raise _BadPart(ei, f"environment {env!r} does not go with {arch} Linux{why}", fits)
        return env
    if os_name == "windows":
        if env in ("", "msvc", "gnu"):
            return env or "msvc"
        raise _BadPart(ei, f"environment {env!r} does not go with windows", ("msvc", "gnu"))
    if os_name == "unknown" and env == "wasm":
        return ""  # MLC's host triple wasm32-unknown-unknown-wasm
    if env:
        raise _BadPart(ei, f"{os_name} takes no environment (got {env!r})", ("",))
    return env


def parse_triple(text: str) -> Triple:
    """Parse and normalize an LLVM-style triple; `TargetError` names the bad part and the closest targets."""
    parts = _split(text)
    try:
        return _parse_parts(parts)
    except _BadPart as bad:
        names = _repairs(parts, bad) or suggest(text, n=2)
        message = f"unknown target {text!r}: {bad.reason}"
        if names:
            message += f" (did you mean {' or '.join(names)}?)"
        raise TargetError(message, hint=_known_hint()) from None


def _repairs(parts: list[str], bad: _BadPart) -> list[str]:
    """Known triples made by swapping the bad part for the nearest words that fit there."""
    if bad.index is None or not bad.fits:
        return []
    words = difflib.get_close_matches(parts[bad.index], bad.fits, n=3, cutoff=0.4) or list(bad.fits)[:1]
    found = []
    for word in words:
        fixed = [p for p in parts[: bad.index] + [word] + parts[bad.index + 1 :] if p]
        try:
            found.append(_parse_parts(fixed))
        except _BadPart:
            continue
    known = set(_specs())
    return _unique([str(t) for t in found if str(t.base) in known])[:2]


# ------------------------------------------------------------------ devices


def parse_device(text: str) -> tuple[str, str | None]:
    """``"cuda:sm_90"`` -> ``("cuda", "sm_90")``; ``"cpu"`` -> ``("cpu", None)``."""
    kind, sep, arch = text.strip().lower().partition(":")
    if kind == "gpu":
        raise TargetError(f"device {text!r} is ambiguous: name the GPU API", hint="GPU devices: " + ", ".join(DEVICES[1:]))
    if kind not in DEVICES:
        close = difflib.get_close_matches(kind, DEVICES, n=1, cutoff=0.5)
        did = f" (did you mean {close[0]}?)" if close else ""
        raise TargetError(f"unknown device {text!r}{did}", hint=f"devices: {', '.join(DEVICES)}")
    if not sep:
        return kind, None
    if kind == "cuda":
        m = _CUDA_ARCH_INPUT.fullmatch(arch)  # sm_90, sm90, 90, sm_90a
        if not m:
            raise TargetError(f"bad CUDA arch in device {text!r}: expected sm_XX, e.g. cuda:sm_90")
        arch = f"sm_{m.group(1)}{m.group(2)}"
        if int(m.group(1)) < _MIN_CUDA_SM:
            raise TargetError(f"CUDA arch {arch} is too old: kiln targets sm_{_MIN_CUDA_SM} and newer")
        return kind, arch
    if kind == "opencl":
        if arch not in _OPENCL_ARCHES:
            raise TargetError(
                f"unknown OpenCL device {arch!r} in {text!r}",
                hint=f"OpenCL devices: {', '.join(_OPENCL_ARCHES)} (or plain opencl)",
            )
        return kind, arch
    raise TargetError(f"device {kind!r} takes no ':{arch}' (only cuda:sm_XX and opencl:adreno|mali do)")


def _format_device(kind: str, arch: str | None) -> str:
    return f"{kind}:{arch}" if arch else kind


# ------------------------------------------------------------- spec data


@dataclass(frozen=True)
class _DeviceData:
    dtypes: tuple[str, ...]
    quant_encodings: tuple[str, ...]
    emit: tuple[str, ...]
    unavailable: Mapping[str, str]
    tvm: Mapping[str, Any]
    default_arch: str | None


@dataclass(frozen=True)
class _SpecData:
    source: str
    triple: Triple
    description: str
    llvm: Mapping[str, Any]
    features: tuple[str, ...]
    onnx_runtime_contrib: bool
    toolchain: Mapping[str, Any]
    devices: Mapping[str, _DeviceData]


@dataclass(frozen=True)
class _PresetData:
    name: str
    triple: Triple
    devices: tuple[str, ...]
    llvm: Mapping[str, Any]
    dtypes: Mapping[str, tuple[str, ...]]
    features: tuple[str, ...]
    description: str


class _Checker:
    """Reads one JSON file's values, raising TargetError that names the file and the key path."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> TargetError:
        return TargetError(f"bad target spec {self.source}: {key}: {problem}")

    def obj(self, value: Any, key: str, required: Collection[str], optional: Collection[str] = ()) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected an object, got {type(value).__name__}")
        for name in required:
            if name not in value:
                raise self.fail(key, f"missing key {name!r}")
        extra = sorted(set(value) - set(required) - set(optional))
        if extra:
            raise self.fail(f"{key}.{extra[0]}", f"unknown key (allowed: {', '.join(sorted({*required, *optional}))})")
        return value

    def str_(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(key, "expected a non-empty string")
        return value

    def strs(self, value: Any, key: str, allowed: Collection[str] | None = None) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, "expected a list of strings")
        if len(set(value)) != len(value):
            raise self.fail(key, "has duplicates")
        if allowed is not None:
            for v in value:
                if v not in allowed:
                    raise self.fail(key, f"unknown value {v!r} (allowed: {', '.join(allowed)})")
        return tuple(value)

    def bool_(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, "expected true or false")
        return value

    def scalars(self, value: Any, key: str) -> dict[str, Any]:
        """A flat object whose values are strings, numbers, booleans or lists of strings."""
        self.obj(value, key, (), value.keys() if isinstance(value, dict) else ())
        for name, v in value.items():
            ok = isinstance(v, (str, int, float, bool)) or (isinstance(v, list) and all(isinstance(s, str) for s in v))
            if not ok:
                raise self.fail(f"{key}.{name}", "expected a string, number, boolean or list of strings")
        return value

    def llvm(self, value: Any, key: str, *, required: bool) -> dict[str, Any]:
        names = ("mcpu", "mattr")
        data = self.obj(value, key, names if required else (), (*names, "mabi", "mfloat-abi"))
        for name in ("mcpu", "mabi", "mfloat-abi"):
            if name in data:
                self.str_(data[name], f"{key}.{name}")
        if "mattr" in data:
            for attr in self.strs(data["mattr"], f"{key}.mattr"):
                if attr[0] not in "+-" or len(attr) < 2:
                    raise self.fail(f"{key}.mattr", f"{attr!r} must start with + or -")
        return data


_SPEC_KEYS = ("schema", "triple", "description", "llvm", "onnx_runtime_contrib", "toolchain", "devices")
_DEVICE_KEYS = ("dtypes", "quant_encodings", "emit")
_TOOLCHAIN_KINDS = ("gcc", "android-ndk", "xcode", "emscripten", "msvc")


def _parse_spec(source: str, data: Any) -> _SpecData:
    """Validate one ``<triple>.json``; *source* is the file name used in errors."""
    c = _Checker(source)
    c.obj(data, "(top)", _SPEC_KEYS, ("features",))
    if data["schema"] != 1:
        raise c.fail("schema", f"unsupported schema {data['schema']!r} (this kiln reads 1)")
    text = c.str_(data["triple"], "triple")
    try:
        triple = _parse_parts(_split(text))
    except _BadPart as bad:
        raise c.fail("triple", bad.reason) from None
    if str(triple) != text or triple.base != triple:
        raise c.fail("triple", f"{text!r} is not canonical (write {str(triple.base)!r})")
    stem = Path(source).name.removesuffix(".json")
    if stem != text:
        raise c.fail("triple", f"{text!r} does not match the file name {stem!r}")

    # Beyond kind and cc a toolchain is free-form: each backend reads what it needs.
    toolchain = c.scalars(data["toolchain"], "toolchain")
    c.obj(toolchain, "toolchain", ("kind", "cc"), toolchain.keys())
    if toolchain["kind"] not in _TOOLCHAIN_KINDS:
        raise c.fail("toolchain.kind", f"unknown {toolchain['kind']!r} (allowed: {', '.join(_TOOLCHAIN_KINDS)})")
    if toolchain["kind"] == "android-ndk":
        for name in ("ndk_env", "default_api"):
            if name not in toolchain:
                raise c.fail("toolchain", f"android-ndk needs {name!r}")
        if not isinstance(toolchain["default_api"], int) or toolchain["default_api"] < _MIN_ANDROID_API:
            raise c.fail("toolchain.default_api", f"expected an API level >= {_MIN_ANDROID_API}")
        if "{api}" not in toolchain["cc"]:
            raise c.fail("toolchain.cc", "an NDK compiler name needs the {api} placeholder")

    contrib = c.bool_(data["onnx_runtime_contrib"], "onnx_runtime_contrib")
    devices_raw = c.obj(data["devices"], "devices", ("cpu",), DEVICES)
    devices = {}
    for kind, raw in devices_raw.items():
        devices[kind] = _parse_device_data(c, f"devices.{kind}", kind, raw, triple, contrib)
    return _SpecData(
        source=source,
        triple=triple,
        description=c.str_(data["description"], "description"),
        llvm=c.llvm(data["llvm"], "llvm", required=True),
        features=c.strs(data.get("features", []), "features"),
        onnx_runtime_contrib=contrib,
        toolchain=toolchain,
        devices=devices,
    )


def _parse_device_data(c: _Checker, key: str, kind: str, raw: Any, triple: Triple, contrib: bool) -> _DeviceData:
    optional = ("unavailable", "tvm") + (("default_arch",) if kind == "cuda" else ())
    c.obj(raw, key, _DEVICE_KEYS + (("default_arch",) if kind == "cuda" else ()), optional)
    platforms, why = _DEVICE_PLATFORMS[kind]
    if triple.platform not in platforms:
        raise c.fail(key, f"{kind} cannot run on {triple.platform}: {why}")
    emit = c.strs(raw["emit"], f"{key}.emit", EMIT_FORMATS)
    encodings = c.strs(raw["quant_encodings"], f"{key}.quant_encodings", QUANT_ENCODINGS)
    for enc in encodings:
        if not _ENCODING_NEEDS_EMIT[enc] & set(emit):
            raise c.fail(f"{key}.quant_encodings", f"{enc!r} needs emit {' or '.join(sorted(_ENCODING_NEEDS_EMIT[enc]))}")
        if enc == "matmulnbits" and not contrib:
            raise c.fail(f"{key}.quant_encodings", "'matmulnbits' is a com.microsoft op; onnx_runtime_contrib is false")
    unavailable = c.scalars(raw.get("unavailable", {}), f"{key}.unavailable")
    for fmt, reason in unavailable.items():
        if fmt not in EMIT_FORMATS or fmt in emit or not isinstance(reason, str):
            raise c.fail(f"{key}.unavailable.{fmt}", "must be an emit format not in emit, with a reason string")
    default_arch = None
    if kind == "cuda":
        try:
            _, default_arch = parse_device("cuda:" + c.str_(raw["default_arch"], f"{key}.default_arch"))
        except TargetError as err:
            raise c.fail(f"{key}.default_arch", str(err)) from None
    tvm = c.scalars(raw.get("tvm", {}), f"{key}.tvm")
    for reserved in ("kind", "host", "arch", "device"):
        if reserved in tvm:
            raise c.fail(f"{key}.tvm.{reserved}", "is set by kiln, not by the spec")
    return _DeviceData(
        dtypes=c.strs(raw["dtypes"], f"{key}.dtypes", DTYPES),
        quant_encodings=encodings,
        emit=emit,
        unavailable=unavailable,
        tvm=tvm,
        default_arch=default_arch,
    )


_PRESET_KEYS = ("triple", "description")
_PRESET_OPTIONAL = ("devices", "mcpu", "mattr", "mabi", "dtypes", "features")
_PRESET_NAME = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")


def _parse_presets(source: str, data: Any, specs: Mapping[str, _SpecData]) -> dict[str, _PresetData]:
    c = _Checker(source)
    c.obj(data, "(top)", ("schema", "presets"))
    if data["schema"] != 1:
        raise c.fail("schema", f"unsupported schema {data['schema']!r} (this kiln reads 1)")
    presets = {}
    raw_presets = data["presets"]
    c.obj(raw_presets, "presets", (), raw_presets.keys() if isinstance(raw_presets, dict) else ())
    for name, raw in raw_presets.items():
        key = f"presets.{name}"
        if not _PRESET_NAME.fullmatch(name):
            raise c.fail(key, "a preset name is lower-case kebab-case")
        c.obj(raw, key, _PRESET_KEYS, _PRESET_OPTIONAL)
        try:
            triple = _parse_parts(_split(c.str_(raw["triple"], f"{key}.triple")))
        except _BadPart as bad:
            raise c.fail(f"{key}.triple", bad.reason) from None
        spec = specs.get(str(triple.base))
        if spec is None:
            raise c.fail(f"{key}.triple", f"no spec file for {str(triple.base)!r}")
        if "devices" in raw:
            devices = c.strs(raw["devices"], f"{key}.devices")
        else:  # a CPU preset: the CPU first, then whatever the triple offers
            devices = tuple(["cpu"] + [d for d in spec.devices if d != "cpu"])
        for dev in devices:
            try:
                kind, _ = parse_device(dev)
            except TargetError as err:
                raise c.fail(f"{key}.devices", str(err)) from None
            if kind not in spec.devices:
                raise c.fail(f"{key}.devices", f"{spec.triple} has no device {kind!r}")
        llvm = c.llvm({k: raw[k] for k in ("mcpu", "mattr", "mabi") if k in raw}, key, required=False)
        dtypes = c.obj(raw.get("dtypes", {}), f"{key}.dtypes", (), spec.devices)
        presets[name] = _PresetData(
            name=name,
            triple=triple,
            devices=devices,
            llvm=llvm,
            dtypes={k: c.strs(v, f"{key}.dtypes.{k}", DTYPES) for k, v in dtypes.items()},
            features=c.strs(raw.get("features", []), f"{key}.features"),
            description=c.str_(raw["description"], f"{key}.description"),
        )
    return presets


def _read_json(path: Any, source: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TargetError(f"bad target spec {source}: {err}") from None


def _spec_dir() -> Any:
    return resources.files("targets").joinpath("specs")


@functools.cache
def _specs() -> dict[str, _SpecData]:
    """Every ``<triple>.json`` (package data), validated once per process."""
    specs = {}
    for entry in sorted(_spec_dir().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json") and entry.name != "presets.json":
            source = f"targets/specs/{entry.name}"
            spec = _parse_spec(source, _read_json(entry, source))
            specs[str(spec.triple)] = spec
    return specs


@functools.cache
def _presets() -> dict[str, _PresetData]:
    source = "targets/specs/presets.json"
    return _parse_presets(source, _read_json(_spec_dir().joinpath("presets.json"), source), _specs())


def known_triples() -> list[str]:
    """The base triples that have a spec file, sorted."""
    return sorted(_specs())


def known_presets() -> list[str]:
    return sorted(_presets())


# --------------------------------------------------------------- resolving


@dataclass(frozen=True)
class TargetSpec:
    """Everything later stages need to know about one target + device.

    ``tvm`` is the TVM target as a JSON dict (``tvm.target.Target(spec.tvm)``);
    for a GPU device the LLVM host target sits under ``"host"``. ``emit`` is
    what the spec declares; the driver still drops formats whose backend is
    not installed. ``unavailable`` maps formats this device cannot emit to why.
    """

    name: str
    triple: str
    device: str
    device_arch: str | None
    tvm: dict[str, Any]
    dtypes: tuple[str, ...]
    quant_encodings: tuple[str, ...]
    onnx_runtime_contrib: bool
    toolchain: dict[str, Any]
    emit: tuple[str, ...]
    features: tuple[str, ...]
    description: str
    unavailable: dict[str, str] = field(default_factory=dict)
    preset: str | None = None

    @property
    def device_string(self) -> str:
        """``cuda:sm_87``, ``opencl:adreno``, ``cpu``: what ``--device`` would say."""
        return _format_device(self.device, self.device_arch)

    @property
    def llvm(self) -> dict[str, Any]:
        """The LLVM (host) target dict: ``tvm`` itself for cpu, ``tvm["host"]`` otherwise."""
        return self.tvm if self.device == "cpu" else self.tvm["host"]

    @property
    def parsed_triple(self) -> Triple:
        return parse_triple(self.triple)

    def to_json(self) -> dict[str, Any]:
        """A plain, key-sorted dict (tuples as lists) for manifest.json; equal specs give equal JSON."""
        data = {
            "name": self.name,
            "preset": self.preset,
            "triple": self.triple,
            "device": self.device,
            "device_arch": self.device_arch,
            "tvm": self.tvm,
            "dtypes": self.dtypes,
            "quant_encodings": self.quant_encodings,
            "onnx_runtime_contrib": self.onnx_runtime_contrib,
            "toolchain": self.toolchain,
            "emit": self.emit,
            "unavailable": self.unavailable,
            "features": self.features,
            "description": self.description,
        }
        return _plain(data)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(value[k]) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def resolve_target(target: str, device: str | None = None) -> TargetSpec:
    """Resolve a triple or preset name plus an optional ``--device`` to a `TargetSpec`."""
    name = target.strip().lower()
    presets = _presets()
    if name in presets:
        return _resolve_preset(presets[name], device)
    triple = parse_triple(target)
    spec = _specs().get(str(triple.base))
    if spec is None:
        names = suggest(str(triple))
        did = f" (did you mean {' or '.join(names[:2])}?)" if names else ""
        raise TargetError(f"no target spec for {str(triple)!r}{did}", hint=_known_hint())
    kind, arch = parse_device(device or "cpu")
    _check_device(spec, kind, str(triple))
    return _build(spec, triple, str(triple), kind, arch, None)


def _check_device(spec: _SpecData, kind: str, label: str) -> None:
    if kind in spec.devices:
        return
    platforms, why = _DEVICE_PLATFORMS[kind]
    reason = why if spec.triple.platform not in platforms else f"{spec.triple} has no {kind} support in kiln"
    others = [t for t, s in sorted(_specs().items()) if kind in s.devices]
    raise TargetError(
        f"device {kind!r} is not available for {label}: {reason}",
        hint=f"devices for {label}: {', '.join(spec.devices)}"
        + (f"; {kind} targets: {', '.join(others)}" if others else ""),
    )


def _resolve_preset(preset: _PresetData, device: str | None) -> TargetSpec:
    offered = dict(parse_device(d) for d in preset.devices)
    if device is None:
        kind, arch = parse_device(preset.devices[0])
    else:
        kind, arch = parse_device(device)
        bare = str(preset.triple)
        if kind not in offered:
            raise TargetError(
                f"preset {preset.name!r} has no device {kind!r} (it has {', '.join(preset.devices)})",
                hint=f"for another device use the triple: --target {bare} --device {device}",
            )
        fixed = offered[kind]
        if arch and fixed and arch != fixed:
            raise TargetError(
                f"preset {preset.name!r} fixes device {kind}:{fixed}; --device {device} conflicts with it",
                hint=f"drop --device, or use --target {bare} --device {device}",
            )
        arch = arch or fixed
    return _build(_specs()[str(preset.triple.base)], preset.triple, preset.name, kind, arch, preset)


def _build(
    spec: _SpecData, triple: Triple, name: str, kind: str, arch: str | None, preset: _PresetData | None
) -> TargetSpec:
    dev = spec.devices[kind]
    llvm = {**copy.deepcopy(dict(spec.llvm)), **copy.deepcopy(dict(preset.llvm if preset else {}))}
    host = {"kind": "llvm", "mtriple": str(triple), **llvm}
    if kind == "cpu":
        tvm = host
    else:
        tvm = {"kind": kind, **copy.deepcopy(dict(dev.tvm))}
        if kind == "cuda":
            arch = arch or dev.default_arch
            tvm["arch"] = arch
        elif kind == "opencl" and arch:
            tvm["device"] = arch
        tvm["host"] = host

    dtypes = preset.dtypes.get(kind, dev.dtypes) if preset else dev.dtypes
    if kind == "cuda" and arch and int(_CUDA_ARCH.fullmatch(arch).group(1)) < 80:
        dtypes = tuple(d for d in dtypes if d != "bfloat16")  # bf16 tensor cores start at Ampere

    enabled = {a[1:] for a in llvm.get("mattr", []) if a.startswith("+")}
    features = tuple(sorted(enabled | set(spec.features) | set(preset.features if preset else ())))
    return TargetSpec(
        name=name,
        triple=str(triple),
        device=kind,
        device_arch=arch,
        tvm=tvm,
        dtypes=tuple(dtypes),
        quant_encodings=dev.quant_encodings,
        onnx_runtime_contrib=spec.onnx_runtime_contrib,
        toolchain=_toolchain(spec, triple),
        emit=dev.emit,
        features=features,
        description=preset.description if preset else spec.description,
        unavailable=dict(dev.unavailable),
        preset=preset.name if preset else None,
    )


def _toolchain(spec: _SpecData, triple: Triple) -> dict[str, Any]:
    tc = copy.deepcopy(dict(spec.toolchain))
    if tc["kind"] == "android-ndk":
        api = triple.android_api or tc["default_api"]
        tc["api"] = api
        for name in ("cc", "cxx"):
            if name in tc:
                tc[name] = tc[name].replace("{api}", str(api))
    return tc


def find_compiler(spec: TargetSpec, environ: Mapping[str, str] | None = None) -> str | None:
    """The path of the C compiler for *spec* on this machine, or None when it is not installed.

    NDK compilers are looked up under ``$ANDROID_NDK_HOME`` (or
    ``$ANDROID_NDK_ROOT``); everything else on ``PATH``.
    """
    env = os.environ if environ is None else environ
    tc = spec.toolchain
    if tc["kind"] == "android-ndk":
        root = env.get(tc["ndk_env"]) or env.get("ANDROID_NDK_ROOT")
        if not root:
            return None
        for candidate in sorted(Path(root).glob(f"toolchains/llvm/prebuilt/*/bin/{tc['cc']}")):
            if os.access(candidate, os.X_OK):
                return str(candidate)
        return None
    return shutil.which(tc["cc"], path=env.get("PATH"))


# -------------------------------------------------------------- suggestions


def suggest(text: str, n: int = 3) -> list[str]:
    """The known triples and presets closest to *text* (difflib), best first."""
    query = text.strip().lower()
    names = known_triples() + known_presets()
    found = difflib.get_close_matches(query, names, n=n, cutoff=0.5)
    try:  # an alias of a known triple ("arm64-linux-gnu") or a known triple plus an API level
        parsed = str(_parse_parts(_split(text)).base)
        if parsed in names:
            found.insert(0, parsed)
    except _BadPart:
        pass
    return _unique(found)[:n]


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _known_hint() -> str:
    return f"known triples: {', '.join(known_triples())}; presets: {', '.join(known_presets())} (see `kiln targets`)"


# ----------------------------------------------------------------- listing


def list_targets() -> list[dict[str, Any]]:
    """One row per base triple, then per preset: what ``kiln targets`` shows."""
    rows = []
    for triple, spec in sorted(_specs().items()):
        rows.append(
            {
                "name": triple,
                "kind": "triple",
                "triple": triple,
                "devices": list(spec.devices),
                "default_device": "cpu",
                "emit": {k: list(d.emit) for k, d in spec.devices.items()},
                "description": spec.description,
            }
        )
    for name, preset in sorted(_presets().items()):
        spec = _specs()[str(preset.triple.base)]
        rows.append(
            {
                "name": name,
                "kind": "preset",
                "triple": str(preset.triple),
                "devices": list(preset.devices),
                "default_device": preset.devices[0],
                "emit": {d: list(spec.devices[parse_device(d)[0]].emit) for d in preset.devices},
                "description": preset.description,
            }
        )
    return rows


def format_targets_table(rows: list[dict[str, Any]] | None = None, *, emits: Collection[str] | None = None) -> str:
    """A text table of *rows* (default `list_targets()`); *emits* keeps only installed backends.

    The default device is starred and the EMIT column is for that device.
    """
    rows = list_targets() if rows is None else rows
    out: list[str] = []
    for kind, title in (("triple", "Triples (--target TRIPLE [--device D])"), ("preset", "Presets (--target NAME)")):
        body = []
        for row in (r for r in rows if r["kind"] == kind):
            emit = [e for e in row["emit"].get(row["default_device"], []) if emits is None or e in emits]
            devices = " ".join(d + ("*" if d == row["default_device"] else "") for d in row["devices"])
            body.append((row["name"], row["triple"] if kind == "preset" else "", devices, ",".join(emit) or "-", row["description"]))
        if not body:
            continue
        header = ("NAME", "TRIPLE" if kind == "preset" else "", "DEVICES", "EMIT", "DESCRIPTION")
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(4)]
        if out:
            out.append("")
        out.append(title)
        for r in [header, *body]:
            cells = [r[i].ljust(widths[i]) for i in range(4) if widths[i]]
            out.append("  " + "  ".join(cells + [r[4]]).rstrip())
    out.append("")
    out.append("* default device; EMIT is for the default device")
    return "\n".join(out)
