"""The compiled Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 kernels: byte-identical to the numpy kernels and to
llama.cpp's ggml_quantize_chunk, lazily compiled into a reused cache, with a silent numpy fallback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from targets.gguf import quants as Q
from targets.gguf.quants import legacy, native
from tests.gguf.test_quants import KINDS, _data

NATIVE = list(native.KERNELS)


@pytest.fixture(autouse=True)
def _fresh_library():
    """Tests that change the environment reload the library; the next test sees the normal one."""
    yield
    native.reset()


def _tricky(kind: str, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Data at the edges of the arithmetic: denormal inputs (1/d overflows to inf), fp16-subnormal
    scales, scales that overflow fp16, half-step ties of the rounding, +0/-0 blocks."""
    if kind == "denormal":
        x = rng.standard_normal(shape) * 1e-39
    elif kind == "denormal_steps":  # multiples of the smallest denormal
        x = rng.integers(-3, 4, shape) * np.float32(1.4e-45)
    elif kind == "fp16_subnormal_scale":
        x = rng.standard_normal(shape) * 3e-6
    elif kind == "huge":  # d overflows fp16 to inf; (max - min) overflows float32 for some blocks
        x = np.clip(rng.standard_normal(shape) * 2e38, -3.4e38, 3.4e38)
    elif kind == "half_steps":  # with a block extreme of 8 / 16 / 127 the scale is exact and values tie,
        x = (rng.integers(-16, 17, shape) * 0.5).astype(np.float32)  # or fall one ulp short of a tie
        short = rng.random(shape) < 0.3
        x[short] = np.nextafter(x[short], np.float32(0))
        x[:, ::32] = rng.choice([8.0, -8.0, 16.0, -16.0, 127.0, -127.0], size=x[:, ::32].shape)
    elif kind == "signed_zeros":
        x = np.where(rng.random(shape) < 0.5, 0.0, -0.0)
        x[::3, 5::32] = rng.standard_normal(x[::3, 5::32].shape)  # some blocks with one nonzero
    else:
        raise AssertionError(kind)
    return x.astype(np.float32)


TRICKY = ["denormal", "denormal_steps", "fp16_subnormal_scale", "huge", "half_steps", "signed_zeros"]


def _numpy(x: np.ndarray, name: str) -> np.ndarray:
    with np.errstate(all="ignore"):  # the extreme kinds overflow on purpose
        return getattr(legacy, name.lower())(x.reshape(-1, 32)).reshape(x.shape[0], -1)


def _native(x: np.ndarray, name: str) -> np.ndarray:
    out = np.zeros((x.size // 32, native.KERNELS[name][1]), np.uint8)
    native.kernel(name)(np.ascontiguousarray(x).reshape(-1, 32), out)
    return out.reshape(x.shape[0], -1)


def _check(x: np.ndarray, name: str, ggml_quantize) -> None:
    ours, reference, theirs = _native(x, name), _numpy(x, name), ggml_quantize(x, Q.TYPES[name].id)
    for label, other in (("numpy", reference), ("llama.cpp", theirs)):
        bad = np.flatnonzero((ours != other).any(axis=1))
        assert bad.size == 0, f"{name}: rows {bad[:5]} differ from {label}"


def test_compiles_here():
    assert native.library() is not None, "a C compiler is installed: the native kernels must load"


@pytest.mark.parametrize("name", NATIVE)
@pytest.mark.parametrize("kind", KINDS + TRICKY)
def test_matches_numpy_and_llama_cpp(name, kind, ggml_quantize):
    rng = np.random.default_rng(len(kind) * 31 + NATIVE.index(name))
    x = _data(kind, rng) if kind in KINDS else _tricky(kind, rng, (16, 512))
    _check(x, name, ggml_quantize)


@pytest.mark.parametrize("shape", [(1, 32), (3, 64), (7, 96), (257, 128), (2, 4128), (40, 4096)])
def test_shapes(shape, ggml_quantize):
    x = np.random.default_rng(shape[0]).laplace(size=shape).astype(np.float32)
    for name in NATIVE:
        _check(x, name, ggml_quantize)


def test_quantize_uses_native_and_threads(ggml_quantize):
    """Through Q.quantize (chunks on the thread pool): equal to llama.cpp."""
    x = np.random.default_rng(5).standard_normal((700, 1024)).astype(np.float32)
    for name in NATIVE:
        assert np.array_equal(Q.quantize(x, name), ggml_quantize(x, Q.TYPES[name].id)), name


def test_fp16_conversion_rounds_like_numpy():
    """Every sign/exponent/top-mantissa pattern with the low 13 bits at and around the rounding tie,
    plus random bit patterns (NaNs need only stay NaNs)."""
    high = np.arange(1 << 19, dtype=np.uint32) << np.uint32(13)
    low = np.array([0, 1, 0xFFF, 0x1000, 0x1001, 0x1FFF], np.uint32)
    rand = np.random.default_rng(0).integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32)
    bits = np.concatenate([(high[:, None] | low[None, :]).reshape(-1), rand])
    x = bits.view(np.float32)
    ours = np.empty(x.size, np.uint16)
    native.library().kiln_fp16(x.ctypes.data, ours.ctypes.data, x.size)
    with np.errstate(all="ignore"):
        theirs = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(ours[~nan], theirs[~nan])
    assert np.all((ours[nan] & 0x7C00) == 0x7C00) and np.all(ours[nan] & 0x3FF)


def _use_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    monkeypatch.delenv("KILN_NO_NATIVE", raising=False)
    native.reset()
    return tmp_path / "gguf-native"


def test_cache_is_reused(monkeypatch, tmp_path):
    folder = _use_cache(monkeypatch, tmp_path)
    assert native.library() is not None
    built = sorted(p.name for p in folder.iterdir())
    assert len(built) == 1 and built[0].endswith(".so")

    def no_compiling(*args):
        raise AssertionError("recompiled although the cache holds the library")

    monkeypatch.setattr(native, "_compile", no_compiling)
    native.reset()
    assert native.library() is not None
    assert sorted(p.name for p in folder.iterdir()) == built


def _in_child(cache: Path, code: str, copies: int = 1) -> None:
    """Run ``code`` in fresh processes (dlopen reuses an already loaded path within a process)."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "KILN_CACHE": str(cache), "PYTHONPATH": str(root)}
    env.pop("KILN_NO_NATIVE", None)
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=root) for _ in range(copies)]
    assert [p.wait(timeout=300) for p in procs] == [0] * copies


def test_damaged_cache_entry_is_rebuilt(monkeypatch, tmp_path):
    folder = _use_cache(monkeypatch, tmp_path)
    assert native.library() is not None
    (entry,) = folder.iterdir()
    entry.unlink()  # a new file, not an overwrite: this process still maps the old one
    entry.write_bytes(b"not a shared library")
    _in_child(tmp_path, "from targets.gguf.quants import native; assert native.library() is not None")
    assert [p.name for p in folder.iterdir()] == [entry.name] and entry.stat().st_size > 1000


def test_source_change_gets_a_new_key(monkeypatch, tmp_path):
    compiler = native.find_compiler()
    before = native._key(compiler)
    changed = tmp_path / "legacy.c"
    changed.write_text(native.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(native, "SOURCE", changed)
    assert native._key(compiler) != before


def _falls_back(ggml_quantize) -> None:
    assert native.library() is None and native.kernel("Q8_0") is None
    x = _data("normal", np.random.default_rng(3))
    for name in NATIVE:
        assert np.array_equal(Q.quantize(x, name), ggml_quantize(x, Q.TYPES[name].id)), name


def test_no_compiler_falls_back_to_numpy(monkeypatch, tmp_path, ggml_quantize):
    folder = _use_cache(monkeypatch, tmp_path)
    monkeypatch.setattr(native.sysconfig, "get_config_var", lambda name: None)
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    _falls_back(ggml_quantize)
    assert not folder.exists() or not any(folder.iterdir())


def test_failing_compiler_falls_back_and_leaves_nothing(monkeypatch, tmp_path, ggml_quantize):
    import shutil

    folder = _use_cache(monkeypatch, tmp_path)
    monkeypatch.setattr(native, "find_compiler", lambda: [shutil.which("false")])
    _falls_back(ggml_quantize)
    assert not any(folder.iterdir()), "a failed compile must leave no file in the cache"


def test_kiln_no_native_forces_numpy(monkeypatch, ggml_quantize):
    monkeypatch.setenv("KILN_NO_NATIVE", "1")
    native.reset()
    _falls_back(ggml_quantize)


def test_parallel_processes_share_one_cache_entry(tmp_path):
    """Two processes compiling into an empty cache at once: both load, one library remains, no temp files."""
    _in_child(tmp_path, "from targets.gguf.quants import native; assert native.library() is not None", copies=2)
    files = sorted(p.name for p in (tmp_path / "gguf-native").iterdir())
    assert len(files) == 1 and files[0].endswith(".so") and ".tmp" not in files[0], files
