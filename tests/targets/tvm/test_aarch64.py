"""Edge artifacts: a CNN and a small decoder compiled for aarch64-linux-gnu are linked into AArch64
ELF libraries and, run under qemu-aarch64 with the aarch64 TVM runtime and kiln's C loader, compute what
onnxruntime computes on the original model.

CI installs the cross toolchain and qemu (.ci/run): nothing here is skipped when they are missing.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

import compiler
from compiler.signature import random_inputs
from tests import model_zoo as mz

from .helpers import assert_matches, elf_machine, kiln, kiln_run, ort_run

EM_AARCH64 = 183
SQUEEZENET = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_squeezenet.onnx"


def _check_aarch64(art, verified: bool = True) -> None:
    assert art.manifest["entry"] == "lib.so", art.manifest["backend"].get("notes")
    assert art.manifest["backend"]["linker"] == "aarch64-linux-gnu-gcc"
    assert elf_machine(art.path / "lib.so") == EM_AARCH64
    if verified:
        verification = art.manifest["verification"]
        assert verification.get("passed"), verification  # verified under emulation at compile time


@pytest.mark.slow
def test_cnn_for_aarch64_runs_under_qemu(tmp_path):
    art = compiler.compile(str(SQUEEZENET), target="aarch64-linux-gnu", emit="tvm", output=tmp_path / "art")
    _check_aarch64(art)
    inputs = random_inputs(art.inputs, seed=3)
    got = kiln_run(art.path, inputs, tmp_path, "--emulate")
    assert_matches(ort_run(SQUEEZENET, inputs), got)


@pytest.mark.slow
def test_decoder_for_aarch64_with_external_params_runs_under_qemu(tmp_path, zoo_dir):
    source = mz.export("llama", zoo_dir)
    # no compile-time check (the CNN test covers that path): the emulated run below is the check
    art = compiler.compile(str(source), target="aarch64-linux-gnu", emit="tvm", output=tmp_path / "art",
                           params="external", verify=False)
    _check_aarch64(art, verified=False)
    assert (art.path / "params" / "tensor-cache.json").is_file()
    inputs = mz.sample_inputs("llama", batch=2, seq=11)
    got = kiln_run(art.path, inputs, tmp_path, "--emulate")
    assert_matches(ort_run(source, inputs), got)


def test_foreign_artifact_needs_emulate(tmp_path):
    example = Path(__file__).resolve().parents[3] / "examples" / "models" / "tiny_cnn.onnx"
    art = compiler.compile(str(example), target="aarch64-linux-gnu", emit="tvm", output=tmp_path / "art", verify=False)
    proc = kiln("run", str(art.path))
    assert proc.returncode == 1
    assert "add --emulate" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    host = compiler.compile(str(example), target="x86_64-linux-gnu", emit="tvm", output=tmp_path / "host", verify=False)
    proc = kiln("run", str(host.path), "--emulate")
    assert proc.returncode == 1 and "drop --emulate" in proc.stderr
