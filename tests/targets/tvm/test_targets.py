"""Targets from the triple spec: cross builds without a linker give objects and say what to install; GPU
devices build with DLight (nothing here runs them: verification says why); the devices this TVM lacks
are refused by the spec; a CPU the host cannot run is reported, not crashed on."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest

import compiler
from compiler.errors import TargetError
from targets.tvm import _env

from .helpers import elf_machine, kiln

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "models" / "tiny_cnn.onnx"


def _compile(tmp_path: Path, target: str, device: str | None = None, **options):
    return compiler.compile(str(EXAMPLE), target=target, device=device, emit="tvm", output=tmp_path / "art", **options)


def test_no_linker_gives_lib_tar_and_names_the_package(tmp_path, monkeypatch):
    from targets.tvm import export

    monkeypatch.setattr(export, "find_compiler", lambda spec: None)  # as on a machine without the cross gcc
    art = _compile(tmp_path, "aarch64-linux-gnu")
    assert art.manifest["entry"] == "lib.tar"
    (note,) = art.manifest["backend"]["notes"]
    assert "aarch64-linux-gnu-gcc" in note and "apt-get install gcc-aarch64-linux-gnu" in note
    with tarfile.open(art.path / "lib.tar") as tar:
        objects = [m.name for m in tar.getmembers() if m.name.endswith(".o")]
    assert objects
    assert "aarch64-linux-gnu" in art.manifest["verification"]["skipped"]


@pytest.mark.parametrize(("target", "words"), [("arm64-apple-darwin", "Xcode"), ("wasm32-unknown-unknown", "emcc")])
def test_platforms_linked_elsewhere_get_objects(tmp_path, target, words):
    art = _compile(tmp_path, target)
    assert art.manifest["entry"] == "lib.tar"
    assert words in art.manifest["backend"]["notes"][0]
    assert "skipped" in art.manifest["verification"]


def test_cli_prints_the_linker_note(tmp_path):
    proc = kiln("compile", str(EXAMPLE), "--target", "riscv64-linux-gnu", "--emit", "tvm", "-o", str(tmp_path / "a"))
    if shutil.which("riscv64-linux-gnu-gcc"):
        pytest.skip("a riscv64 cross gcc is installed here: the artifact is linked")  # not in CI
    assert proc.returncode == 0, proc.stderr
    assert "kiln: note: wrote lib.tar" in proc.stderr and "gcc-riscv64-linux-gnu" in proc.stderr


def test_opencl_builds_with_dlight(tmp_path):
    art = _compile(tmp_path, "aarch64-linux-gnu", device="opencl")
    assert art.manifest["backend"]["schedule"] == "dlight-gpu"
    assert art.manifest["entry"] == "lib.so" and elf_machine(art.path / "lib.so") == 183
    assert "opencl" in art.manifest["verification"]["skipped"]


def test_adreno_preset_uses_the_adreno_rules(tmp_path):
    art = _compile(tmp_path, "android-adreno")
    assert art.manifest["backend"]["schedule"] == "dlight-adreno"
    assert "opencl:adreno" in art.manifest["verification"]["skipped"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="TVM compiles CUDA kernels with nvcc, not installed")
def test_cuda_builds(tmp_path):
    art = _compile(tmp_path, "x86_64-linux-gnu", device="cuda:sm_80")
    assert art.manifest["backend"]["schedule"] == "dlight-gpu"
    assert "cuda:sm_80" in art.manifest["verification"]["skipped"]


def test_vulkan_is_refused_by_the_spec(tmp_path):
    with pytest.raises(TargetError, match="does not support --emit tvm"):
        _compile(tmp_path, "aarch64-linux-gnu", device="vulkan")


def test_cpu_features_the_host_lacks_are_reported(tmp_path):
    art = _compile(tmp_path, "x86-avx512")
    missing = _env.missing_cpu_features(art.manifest["target"]["tvm"]["mattr"])
    if missing:
        assert "avx512" in art.manifest["verification"]["skipped"]
    else:
        assert art.manifest["verification"]["passed"]
