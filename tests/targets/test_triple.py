"""Target triples, spec files, presets and device resolution."""

from __future__ import annotations

import json
import os
import stat

import pytest

from compiler.errors import TargetError
from targets import triple as tt
from targets.triple import (
    Triple,
    find_compiler,
    format_targets_table,
    known_presets,
    known_triples,
    list_targets,
    parse_device,
    parse_triple,
    resolve_target,
    suggest,
)

BASE_TRIPLES = {
    "x86_64-linux-gnu",
    "aarch64-linux-gnu",
    "aarch64-linux-android",
    "armv7a-linux-androideabi",
    "armv7a-linux-gnueabihf",
    "riscv64-linux-gnu",
    "wasm32-unknown-unknown",
    "arm64-apple-ios",
    "arm64-apple-darwin",
    "x86_64-apple-darwin",
    "x86_64-pc-windows-msvc",
}

# LLVM subtarget feature names per architecture: a spec that puts an x86
# feature on an Arm triple (or misspells one) fails here, not inside LLVM.
LLVM_FEATURES = {
    "x86_64": {"sse4.2", "popcnt", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl",
               "avx512cd", "avx512vnni", "avx512bf16", "avx512fp16", "amx-tile", "amx-int8", "amx-bf16"},
    "aarch64": {"neon", "v8.2a", "dotprod", "fullfp16", "rcpc", "crc", "i8mm", "bf16"},
    "arm64": {"neon", "v8.2a", "dotprod", "fullfp16", "rcpc", "crc", "i8mm", "bf16"},
    "armv7a": {"neon", "vfp3"},
    "riscv64": {"m", "a", "f", "d", "c", "v"},
    "wasm32": {"simd128"},
}  # fmt: skip
LLVM_CPUS = {
    "x86_64": {"x86-64-v2", "haswell", "skylake-avx512", "cascadelake", "sapphirerapids"},
    "aarch64": {"generic", "cortex-a72", "cortex-a76", "cortex-a78"},
    "arm64": {"apple-m1", "apple-m2", "apple-a12"},
    "armv7a": {"generic"},
    "riscv64": {"generic-rv64"},
    "wasm32": {"generic"},
}


def _message(excinfo: pytest.ExceptionInfo[TargetError]) -> str:
    return str(excinfo.value)


# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize("text", sorted(BASE_TRIPLES) + ["aarch64-linux-android29", "armv7a-linux-androideabi21"])
def test_canonical_triples_round_trip(text: str) -> None:
    assert str(parse_triple(text)) == text


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("x86_64-unknown-linux-gnu", "x86_64-linux-gnu"),
        ("x86_64-pc-linux-gnu", "x86_64-linux-gnu"),
        ("amd64-linux", "x86_64-linux-gnu"),
        ("x86-64-linux-gnu", "x86_64-linux-gnu"),
        ("X86_64-Linux-GNU", "x86_64-linux-gnu"),
        ("arm64-linux-gnu", "aarch64-linux-gnu"),
        ("aarch64-unknown-linux-gnu", "aarch64-linux-gnu"),
        ("aarch64-linux", "aarch64-linux-gnu"),
        ("aarch64-android", "aarch64-linux-android"),
        ("arm64-linux-android", "aarch64-linux-android"),
        ("aarch64-apple-darwin", "arm64-apple-darwin"),
        ("arm64-apple-macos", "arm64-apple-darwin"),
        ("arm64-apple-macosx", "arm64-apple-darwin"),
        ("aarch64-apple-ios", "arm64-apple-ios"),
        ("arm64-ios", "arm64-apple-ios"),
        ("armv7-linux-gnueabihf", "armv7a-linux-gnueabihf"),
        ("armv7l-linux", "armv7a-linux-gnueabihf"),
        ("arm-linux-androideabi", "armv7a-linux-androideabi"),
        ("armv7a-linux-android24", "armv7a-linux-androideabi24"),
        ("riscv64gc-linux-gnu", "riscv64-linux-gnu"),
        ("wasm32-unknown-unknown-wasm", "wasm32-unknown-unknown"),
        ("wasm32-unknown", "wasm32-unknown-unknown"),
        ("x86_64-windows-msvc", "x86_64-pc-windows-msvc"),
        ("x86_64-windows", "x86_64-pc-windows-msvc"),
    ],
)
def test_aliases_normalize(text: str, canonical: str) -> None:
    assert str(parse_triple(text)) == canonical


def test_vendor_is_optional() -> None:
    short = parse_triple("x86_64-linux-gnu")
    assert short == parse_triple("x86_64-unknown-linux-gnu")
    assert short == Triple("x86_64", "unknown", "linux", "gnu")
    assert parse_triple("arm64-apple-ios") == Triple("arm64", "apple", "ios", "")


def test_android_triple_fields() -> None:
    t = parse_triple("aarch64-linux-android29")
    assert (t.arch, t.vendor, t.os, t.env) == ("aarch64", "unknown", "linux", "android29")
    assert t.is_android and t.platform == "android" and t.android_api == 29
    assert str(t.base) == "aarch64-linux-android"
    assert parse_triple("aarch64-linux-android").android_api is None
    assert parse_triple("wasm32-unknown-unknown").platform == "wasm"
    assert parse_triple("arm64-apple-darwin").is_apple


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("aarch64-linx-gnu", "unknown target 'aarch64-linx-gnu': OS 'linx' is not known (did you mean aarch64-linux-gnu?)"),
        ("arm64-appel-ios", "unknown target 'arm64-appel-ios': vendor 'appel' is not known (did you mean arm64-apple-ios?)"),
        ("aarch65-linux-gnu", "unknown target 'aarch65-linux-gnu': architecture 'aarch65' is not known (did you mean aarch64-linux-gnu?)"),
        ("x86_64-linux-gnueabihf", "unknown target 'x86_64-linux-gnueabihf': environment 'gnueabihf' does not go with x86_64 Linux (did you mean x86_64-linux-gnu?)"),
        ("wasm32-linux", "unknown target 'wasm32-linux': wasm32 has no OS 'linux': it is wasm32-unknown-unknown (did you mean wasm32-unknown-unknown?)"),
        ("x86_64-apple-ios", "unknown target 'x86_64-apple-ios': iOS devices are arm64 (did you mean arm64-apple-ios?)"),
    ],
)  # fmt: skip
def test_bad_part_is_named_with_closest_triple(text: str, expected: str) -> None:
    with pytest.raises(TargetError) as excinfo:
        parse_triple(text)
    assert _message(excinfo) == expected
    assert "known triples:" in excinfo.value.hint


def test_armv7_soft_float_env_points_to_gnueabihf() -> None:
    with pytest.raises(TargetError, match=r"'gnu' does not go with armv7a .*did you mean armv7a-linux-gnueabihf\?"):
        parse_triple("armv7a-linux-gnu")


def test_misspelled_preset_suggests_the_preset() -> None:
    with pytest.raises(TargetError, match=r"did you mean raspberry-pi-5"):
        resolve_target("rasberry-pi-5")


@pytest.mark.parametrize("text", ["", "aarch64", "a-b-c-d-e", "x86_64--gnu"])
def test_malformed_triples(text: str) -> None:
    with pytest.raises(TargetError, match="expected arch-vendor-os"):
        parse_triple(text)


def test_bare_arch_suggests_a_triple_with_that_arch() -> None:
    with pytest.raises(TargetError, match=r"did you mean aarch64-linux-gnu"):
        parse_triple("aarch64")


def test_android_api_below_ndk_minimum() -> None:
    with pytest.raises(TargetError, match="API level 19 is below 21"):
        parse_triple("aarch64-linux-android19")


def test_valid_triple_without_spec_names_neighbours() -> None:
    with pytest.raises(TargetError) as excinfo:
        resolve_target("x86_64-linux-android")
    assert _message(excinfo).startswith("no target spec for 'x86_64-linux-android' (did you mean aarch64-linux-android")
    with pytest.raises(TargetError, match=r"no target spec for 'aarch64-linux-musl' \(did you mean aarch64-linux-gnu"):
        resolve_target("aarch64-linux-musl")


def test_suggest() -> None:
    assert suggest("raspbery-pi-5")[0] == "raspberry-pi-5"
    assert suggest("arm64-linux-gnu")[0] == "aarch64-linux-gnu"
    assert suggest("aarch64-linux-android33")[0] == "aarch64-linux-android"
    assert suggest("zzzz") == []


# ------------------------------------------------------------------ devices


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("cpu", ("cpu", None)),
        ("cuda", ("cuda", None)),
        ("cuda:sm_90", ("cuda", "sm_90")),
        ("CUDA:SM_90A", ("cuda", "sm_90a")),
        ("cuda:89", ("cuda", "sm_89")),
        ("cuda:sm87", ("cuda", "sm_87")),
        ("opencl:adreno", ("opencl", "adreno")),
        ("metal", ("metal", None)),
        ("webgpu", ("webgpu", None)),
    ],
)
def test_parse_device(text: str, parsed: tuple[str, str | None]) -> None:
    assert parse_device(text) == parsed


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("metl", r"unknown device 'metl' \(did you mean metal\?\)"),
        ("gpu", r"'gpu' is ambiguous"),
        ("cuda:ampere", r"bad CUDA arch .*sm_XX"),
        ("cuda:sm_35", r"sm_35 is too old"),
        ("cuda:", r"bad CUDA arch"),
        ("vulkan:rdna3", r"takes no ':rdna3'"),
        ("opencl:powervr", r"unknown OpenCL device 'powervr'"),
    ],
)
def test_bad_devices(text: str, pattern: str) -> None:
    with pytest.raises(TargetError, match=pattern):
        parse_device(text)


def test_cuda_target_dict_and_default_arch() -> None:
    spec = resolve_target("x86_64-linux-gnu", "cuda:sm_90")
    assert spec.device == "cuda" and spec.device_arch == "sm_90" and spec.device_string == "cuda:sm_90"
    assert spec.tvm == {
        "kind": "cuda",
        "arch": "sm_90",
        "host": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v2", "mattr": ["+sse4.2", "+popcnt"]},
    }
    assert spec.llvm is spec.tvm["host"]
    assert resolve_target("x86_64-linux-gnu", "cuda").device_arch == "sm_80"
    assert resolve_target("aarch64-linux-gnu", "cuda").device_arch == "sm_87"


def test_bfloat16_dropped_before_ampere() -> None:
    assert "bfloat16" in resolve_target("x86_64-linux-gnu", "cuda:sm_80").dtypes
    assert "bfloat16" not in resolve_target("x86_64-linux-gnu", "cuda:sm_75").dtypes


def test_opencl_adreno_sets_tvm_device() -> None:
    spec = resolve_target("aarch64-linux-android", "opencl:adreno")
    assert spec.tvm["kind"] == "opencl" and spec.tvm["device"] == "adreno"
    assert spec.tvm["host"]["mtriple"] == "aarch64-linux-android"
    assert "onnx" not in spec.emit and "onnxruntime" in spec.unavailable["onnx"]


@pytest.mark.parametrize(
    ("triple", "device", "pattern"),
    [
        ("x86_64-linux-gnu", "metal", r"device 'metal' is not available for x86_64-linux-gnu: Metal is Apple's GPU API"),
        ("aarch64-linux-gnu", "metal", r"Metal is Apple's GPU API"),
        ("aarch64-linux-android", "cuda", r"device 'cuda' is not available for aarch64-linux-android: CUDA needs an NVIDIA GPU"),
        ("arm64-apple-ios", "cuda", r"CUDA needs an NVIDIA GPU"),
        ("wasm32-unknown-unknown", "cuda:sm_90", r"CUDA needs an NVIDIA GPU"),
        ("aarch64-linux-gnu", "webgpu", r"WebGPU is the browser's GPU API \(wasm32-unknown-unknown\)"),
        ("arm64-apple-darwin", "opencl", r"Apple platforms use metal"),
        ("arm64-apple-darwin", "vulkan", r"Apple platforms use metal"),
        ("riscv64-linux-gnu", "vulkan", r"riscv64-linux-gnu has no vulkan support"),
    ],
)  # fmt: skip
def test_device_combinations_rejected(triple: str, device: str, pattern: str) -> None:
    with pytest.raises(TargetError, match=pattern) as excinfo:
        resolve_target(triple, device)
    assert excinfo.value.hint.startswith(f"devices for {triple}: cpu")


def test_rejected_metal_hint_lists_metal_targets() -> None:
    with pytest.raises(TargetError) as excinfo:
        resolve_target("x86_64-linux-gnu", "metal")
    assert "metal targets: arm64-apple-darwin, arm64-apple-ios, x86_64-apple-darwin" in excinfo.value.hint


# ------------------------------------------------------------------ spec files


def test_spec_files_are_the_expected_triples() -> None:
    assert set(known_triples()) == BASE_TRIPLES


@pytest.mark.parametrize("triple", sorted(BASE_TRIPLES))
def test_cpu_spec_is_an_llvm_target_for_the_triple(triple: str) -> None:
    spec = resolve_target(triple)
    assert spec.name == triple and spec.triple == triple and spec.device == "cpu" and spec.preset is None
    assert spec.tvm["kind"] == "llvm"
    assert spec.tvm["mtriple"] == triple
    arch = parse_triple(triple).arch
    assert spec.tvm["mcpu"] in LLVM_CPUS[arch]
    assert spec.tvm["mattr"], "a baseline names its vector features"
    assert {a.lstrip("+-") for a in spec.tvm["mattr"]} <= LLVM_FEATURES[arch]
    assert spec.dtypes[0] == "float32"
    assert "onnx" in spec.emit and "tvm" in spec.emit
    assert set(spec.quant_encodings) >= {"qdq", "tvm-packed"}
    assert spec.toolchain["cc"]


@pytest.mark.parametrize("triple", sorted(BASE_TRIPLES))
def test_every_declared_device_resolves_with_llvm_host(triple: str) -> None:
    for row in list_targets():
        if row["name"] == triple:
            devices = row["devices"]
    for device in devices:
        spec = resolve_target(triple, device)
        if device == "cpu":
            continue
        assert spec.tvm["kind"] == device
        assert spec.tvm["host"] == resolve_target(triple).tvm


def test_riscv_uses_the_lp64d_abi() -> None:
    # Without mabi LLVM emits soft-float objects that will not link with a lp64d gcc sysroot.
    assert resolve_target("riscv64-linux-gnu").tvm["mabi"] == "lp64d"


def test_vulkan_emits_only_gguf_and_says_why_not_tvm() -> None:
    spec = resolve_target("x86_64-linux-gnu", "vulkan")
    assert spec.emit == ("gguf",)
    assert "Vulkan" in spec.unavailable["tvm"]


def test_webgpu_and_metal_emits() -> None:
    web = resolve_target("wasm32-unknown-unknown", "webgpu")
    assert web.emit == ("onnx", "tvm", "mlc") and "gguf" not in web.quant_encodings
    ios = resolve_target("arm64-apple-ios", "metal")
    assert ios.tvm["libs"] == ["iphoneos"] and ios.tvm["host"]["mtriple"] == "arm64-apple-ios"


def test_android_toolchain_uses_api_level() -> None:
    default = resolve_target("aarch64-linux-android").toolchain
    assert default["cc"] == "aarch64-linux-android24-clang" and default["api"] == 24
    pinned = resolve_target("aarch64-linux-android29")
    assert pinned.toolchain["cc"] == "aarch64-linux-android29-clang"
    assert pinned.tvm["mtriple"] == "aarch64-linux-android29"
    assert resolve_target("android-armv7").toolchain["cxx"] == "armv7a-linux-androideabi24-clang++"


def test_gcc_toolchains_name_debian_packages() -> None:
    tc = resolve_target("aarch64-linux-gnu").toolchain
    assert (tc["cc"], tc["debian_package"], tc["emulator"]) == (
        "aarch64-linux-gnu-gcc",
        "gcc-aarch64-linux-gnu",
        "qemu-aarch64",
    )
    assert resolve_target("armv7a-linux-gnueabihf").toolchain["cc"] == "arm-linux-gnueabihf-gcc"


# ------------------------------------------------------------------ presets


@pytest.mark.parametrize("name", known_presets())
def test_every_preset_resolves_on_each_of_its_devices(name: str) -> None:
    row = next(r for r in list_targets() if r["name"] == name)
    default = resolve_target(name)
    assert default.name == name and default.preset == name
    assert default.device_string == row["default_device"]
    assert default.llvm["mtriple"] == row["triple"]
    assert {a.lstrip("+-") for a in default.llvm["mattr"]} <= LLVM_FEATURES[parse_triple(row["triple"]).arch]
    assert default.llvm["mcpu"] in LLVM_CPUS[parse_triple(row["triple"]).arch]
    for device in row["devices"]:
        kind, arch = parse_device(device)
        spec = resolve_target(name, device)
        assert spec.device == kind and spec.tvm["kind"] == ("llvm" if kind == "cpu" else kind)
        if arch:
            assert spec.device_arch == arch


def test_preset_values() -> None:
    pi5 = resolve_target("raspberry-pi-5")
    assert pi5.tvm == {
        "kind": "llvm",
        "mtriple": "aarch64-linux-gnu",
        "mcpu": "cortex-a76",
        "mattr": ["+neon", "+v8.2a", "+dotprod", "+fullfp16", "+rcpc", "+crc"],
    }
    assert "dotprod" in pi5.features and "float16" in pi5.dtypes
    orin = resolve_target("jetson-orin")
    assert orin.tvm["kind"] == "cuda" and orin.tvm["arch"] == "sm_87"
    assert orin.tvm["host"]["mcpu"] == "cortex-a78"
    m1 = resolve_target("apple-m1")
    assert m1.device == "metal" and m1.triple == "arm64-apple-darwin"
    assert resolve_target("iphone").triple == "arm64-apple-ios"
    avx512 = resolve_target("x86-avx512")
    assert avx512.tvm["mcpu"] == "skylake-avx512" and "+avx512f" in avx512.tvm["mattr"]
    spr = resolve_target("x86-sapphirerapids")
    assert {"amx-int8", "avx512vnni", "avx512bf16"} <= set(spr.features) and "bfloat16" in spr.dtypes
    assert resolve_target("webgpu-browser").tvm["kind"] == "webgpu"
    assert resolve_target("android-arm64").triple == "aarch64-linux-android"


def test_preset_name_is_case_insensitive() -> None:
    assert resolve_target("Raspberry-Pi-5").name == "raspberry-pi-5"


def test_preset_device_override_keeps_cpu_tuning() -> None:
    cpu = resolve_target("jetson-orin", "cpu")
    assert cpu.tvm["kind"] == "llvm" and cpu.tvm["mcpu"] == "cortex-a78"
    assert resolve_target("jetson-orin", "cuda").device_arch == "sm_87"
    assert resolve_target("jetson-orin", "cuda:sm_87").device_arch == "sm_87"
    assert resolve_target("x86-avx2", "cuda:sm_89").tvm["host"]["mcpu"] == "haswell"


def test_preset_conflicting_device_rejected() -> None:
    with pytest.raises(TargetError, match=r"preset 'jetson-orin' fixes device cuda:sm_87; --device cuda:sm_90") as e:
        resolve_target("jetson-orin", "cuda:sm_90")
    assert e.value.hint == "drop --device, or use --target aarch64-linux-gnu --device cuda:sm_90"
    with pytest.raises(TargetError, match=r"preset 'apple-m1' has no device 'vulkan' \(it has metal, cpu\)") as e:
        resolve_target("apple-m1", "vulkan")
    assert "--target arm64-apple-darwin --device vulkan" in e.value.hint


# ------------------------------------------------------------------ to_json


def test_to_json_is_deterministic_and_sorted() -> None:
    a = resolve_target("jetson-orin").to_json()
    b = resolve_target("jetson-orin").to_json()
    assert json.dumps(a) == json.dumps(b)
    assert json.dumps(a) == json.dumps(a, sort_keys=True)
    assert list(a) == sorted(a)
    assert json.loads(json.dumps(a)) == a
    assert a["tvm"]["host"]["mattr"] == ["+neon", "+v8.2a", "+dotprod", "+fullfp16", "+rcpc"]  # order kept
    assert a["dtypes"] == ["float32", "float16", "bfloat16", "int8"]
    assert a["preset"] == "jetson-orin" and a["device_arch"] == "sm_87"


def test_resolved_specs_do_not_share_mutable_state() -> None:
    first = resolve_target("x86-avx2")
    first.tvm["mattr"].append("+avx512f")
    first.toolchain["cc"] = "bogus"
    again = resolve_target("x86-avx2")
    assert "+avx512f" not in again.tvm["mattr"] and again.toolchain["cc"] == "x86_64-linux-gnu-gcc"


# ------------------------------------------------------------------ validation


def _good_spec() -> dict:
    return {
        "schema": 1,
        "triple": "aarch64-linux-gnu",
        "description": "d",
        "llvm": {"mcpu": "generic", "mattr": ["+neon"]},
        "onnx_runtime_contrib": True,
        "toolchain": {"kind": "gcc", "cc": "aarch64-linux-gnu-gcc"},
        "devices": {"cpu": {"dtypes": ["float32"], "quant_encodings": ["qdq"], "emit": ["onnx"]}},
    }


def test_good_spec_parses() -> None:
    spec = tt._parse_spec("specs/aarch64-linux-gnu.json", _good_spec())
    assert str(spec.triple) == "aarch64-linux-gnu"


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda s: s["devices"]["cpu"].update(emitt=["onnx"]), r"devices\.cpu\.emitt: unknown key"),
        (lambda s: s["devices"]["cpu"].update(emit=["onnx", "tmv"]), r"devices\.cpu\.emit: unknown value 'tmv'"),
        (lambda s: s["devices"]["cpu"].update(quant_encodings=["gguf"]), r"'gguf' needs emit gguf"),
        (lambda s: s["devices"].update(metal=s["devices"]["cpu"]), r"devices\.metal: metal cannot run on linux"),
        (lambda s: s["devices"].update(cuda=dict(s["devices"]["cpu"])), r"devices\.cuda: missing key 'default_arch'"),
        (lambda s: s.update(triple="arm64-linux-gnu"), r"triple: 'arm64-linux-gnu' is not canonical"),
        (lambda s: s.update(triple="x86_64-linux-gnu"), r"does not match the file name 'aarch64-linux-gnu'"),
        (lambda s: s["llvm"].update(mattr=["neon"]), r"llvm\.mattr: 'neon' must start with \+ or -"),
        (lambda s: s.pop("toolchain"), r"\(top\): missing key 'toolchain'"),
        (lambda s: s.update(schema=2), r"schema: unsupported schema 2"),
        (lambda s: s.update(onnx_runtime_contrib=False) or s["devices"]["cpu"].update(quant_encodings=["matmulnbits"]),
         r"com\.microsoft op"),
        (lambda s: s["devices"]["cpu"].update(tvm={"kind": "cuda"}), r"devices\.cpu\.tvm\.kind: is set by kiln"),
    ],
)  # fmt: skip
def test_bad_spec_names_file_and_key(edit, pattern: str) -> None:
    data = _good_spec()
    edit(data)
    with pytest.raises(TargetError, match=r"^bad target spec specs/aarch64-linux-gnu\.json: " + ".*" + pattern):
        tt._parse_spec("specs/aarch64-linux-gnu.json", data)


def test_bad_preset_names_file_and_key() -> None:
    specs = tt._specs()
    data = {"schema": 1, "presets": {"pi": {"triple": "aarch64-linux-gnu", "description": "d", "devices": ["metal"]}}}
    with pytest.raises(TargetError, match=r"^bad target spec p\.json: presets\.pi\.devices: aarch64-linux-gnu has no device 'metal'"):
        tt._parse_presets("p.json", data, specs)
    data = {"schema": 1, "presets": {"pi": {"triple": "aarch64-linux-gnu", "description": "d", "mcpu": 7}}}
    with pytest.raises(TargetError, match=r"presets\.pi\.mcpu: expected a non-empty string"):
        tt._parse_presets("p.json", data, specs)
    data = {"schema": 1, "presets": {"Pi_5": {"triple": "aarch64-linux-gnu", "description": "d"}}}
    with pytest.raises(TargetError, match=r"presets\.Pi_5: a preset name is lower-case kebab-case"):
        tt._parse_presets("p.json", data, specs)


def test_unreadable_json_names_file(tmp_path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(TargetError, match=r"^bad target spec broken\.json: Expecting property name"):
        tt._read_json(path, "broken.json")


def test_shipped_specs_load_from_package_data() -> None:
    spec_dir = tt._spec_dir()
    files = sorted(e.name for e in spec_dir.iterdir() if e.name.endswith(".json"))
    assert files == sorted([f"{t}.json" for t in BASE_TRIPLES] + ["presets.json"])
    assert tt._specs() is tt._specs()  # cached


# ------------------------------------------------------------------ toolchain lookup


def _executable(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_find_compiler_in_ndk(tmp_path) -> None:
    spec = resolve_target("aarch64-linux-android29")
    assert find_compiler(spec, environ={}) is None
    clang = tmp_path / "toolchains/llvm/prebuilt/linux-x86_64/bin/aarch64-linux-android29-clang"
    _executable(clang)
    assert find_compiler(spec, environ={"ANDROID_NDK_HOME": str(tmp_path)}) == str(clang)
    assert find_compiler(spec, environ={"ANDROID_NDK_ROOT": str(tmp_path)}) == str(clang)


def test_find_compiler_on_path(tmp_path) -> None:
    spec = resolve_target("riscv64-linux-gnu")
    assert find_compiler(spec, environ={"PATH": str(tmp_path)}) is None
    _executable(tmp_path / "riscv64-linux-gnu-gcc")
    assert find_compiler(spec, environ={"PATH": str(tmp_path) + os.pathsep + "/nonexistent"}) == str(
        tmp_path / "riscv64-linux-gnu-gcc"
    )


# ------------------------------------------------------------------ listing


def test_list_targets_rows() -> None:
    rows = {r["name"]: r for r in list_targets()}
    assert set(rows) == BASE_TRIPLES | set(known_presets())
    assert {"android-arm64", "android-armv7", "raspberry-pi-4", "raspberry-pi-5", "jetson-orin", "apple-m1",
            "apple-m2", "iphone", "x86-avx2", "x86-avx512", "webgpu-browser"} <= set(known_presets())  # fmt: skip
    assert rows["jetson-orin"]["kind"] == "preset" and rows["jetson-orin"]["default_device"] == "cuda:sm_87"
    assert rows["x86_64-linux-gnu"]["devices"] == ["cpu", "cuda", "opencl", "vulkan"]
    assert rows["x86_64-linux-gnu"]["emit"]["vulkan"] == ["gguf"]
    assert rows["wasm32-unknown-unknown"]["emit"]["webgpu"] == ["onnx", "tvm", "mlc"]


def test_format_targets_table() -> None:
    text = format_targets_table()
    lines = text.splitlines()
    assert lines[0].startswith("Triples") and any(l.startswith("Presets") for l in lines)
    orin = next(l for l in lines if l.strip().startswith("jetson-orin "))
    assert "aarch64-linux-gnu" in orin and "cuda:sm_87* cpu" in orin and "onnx,tvm,mlc,gguf" in orin
    only_onnx = format_targets_table(emits={"onnx"})
    adreno = next(l for l in only_onnx.splitlines() if l.strip().startswith("android-adreno "))
    assert " - " in adreno  # opencl emits tvm and mlc only: nothing installed
    arm = next(l for l in only_onnx.splitlines() if l.strip().startswith("aarch64-linux-gnu "))
    assert "onnx " in arm and "tvm" not in arm
