"""kiln --quantize TYPE against llama.cpp's own quantization of kiln's F32 file
(``llama_model_quantize``): every tensor's type and bytes must be identical."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

import compiler
from targets.gguf import format as gguf
from targets.gguf import mix

ALL = list(mix.FTYPES)
QUANTIZED = [f for f in ALL if f not in ("f32", "f16", "bf16")]


def _tensors(path):
    reader = gguf.Reader(path)
    return {t.name: (t.type_id, bytes(reader.data(t))) for t in reader.tensors}


def _scheme(ftype: str) -> str:
    return {"f16": "fp16"}.get(ftype, ftype)


def _llama_quantize(llama_cpp, src, dst, ftype: str, pure: bool = False, imatrix=None) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = mix.FTYPES[ftype][0]
    params.pure = pure
    params.nthread = 2
    keep = []
    if imatrix is not None:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            values = np.ascontiguousarray(values, np.float32)
            keep += [values, name.encode()]
            arr[i].name, arr[i].size = keep[-1], values.size
            arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


@pytest.fixture(scope="module")
def f32_files(wide_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("wide-f32")
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = compiler.compile(str(wide_checkpoints(arch)), emit="gguf", quantize="f32",
                                           output=root / arch, verify=False).path / "model.gguf"
        return cache[arch]

    return get


def _compare(arch, ftype, wide_checkpoints, f32_files, llama_cpp, tmp_path, pure=False, imatrix_file=None,
             imatrix=None, verify=False):
    spec = _scheme(ftype) + ("{" + ",".join(
        (["pure=true"] if pure else []) + ([f"imatrix={imatrix_file}"] if imatrix_file else [])) + "}"
        if pure or imatrix_file else "")
    art = compiler.compile(str(wide_checkpoints(arch)), emit="gguf", quantize=spec, output=tmp_path / "kiln",
                           verify=verify)
    _llama_quantize(llama_cpp, f32_files(arch), tmp_path / "llama.gguf", ftype, pure, imatrix)
    ours, theirs = _tensors(art.path / "model.gguf"), _tensors(tmp_path / "llama.gguf")
    assert ours.keys() == theirs.keys()
    wrong_type = [n for n in theirs if ours[n][0] != theirs[n][0]]
    assert not wrong_type, f"{ftype}: tensor types differ, e.g. {wrong_type[0]}"
    wrong_bytes = [n for n in theirs if ours[n][1] != theirs[n][1]]
    assert not wrong_bytes, f"{ftype}: tensor bytes differ, e.g. {wrong_bytes[0]}"
    return art


@pytest.mark.parametrize("ftype", ALL)
def test_llama_every_file_type(ftype, wide_checkpoints, f32_files, llama_cpp, tmp_path):
    _compare("llama", ftype, wide_checkpoints, f32_files, llama_cpp, tmp_path)


@pytest.mark.parametrize("arch,ftype", [("qwen2", "q4_k_m"), ("qwen2", "q2_k"), ("gpt2", "q3_k_l"),
                                        ("gpt2", "q8_0"), ("mistral", "q3_k_m")])
def test_other_architectures(arch, ftype, wide_checkpoints, f32_files, llama_cpp, tmp_path):
    art = _compare(arch, ftype, wide_checkpoints, f32_files, llama_cpp, tmp_path, verify=True)
    assert art.manifest["verification"]["passed"]
    assert art.manifest["quantization"]["scheme"] == ftype


@pytest.mark.parametrize("ftype", ["q2_k", "q5_k_s"])
def test_pure_types(ftype, wide_checkpoints, f32_files, llama_cpp, tmp_path):
    _compare("llama", ftype, wide_checkpoints, f32_files, llama_cpp, tmp_path, pure=True)


def _imatrix_file(path, f32_file):
    """A llama.cpp GGUF imatrix (in_sum2 + counts per weight) with random statistics."""
    rng = np.random.default_rng(0)
    reader = gguf.Reader(f32_file)
    infos, data, values = [], [], {}
    for t in reader.tensors:
        if len(t.shape) != 2:
            continue
        sums = (rng.random(t.shape[-1]) * 40 + 0.01).astype(np.float32)
        counts = np.array([[8.0]], np.float32)
        values[t.name] = sums / np.float32(8)
        infos += [gguf.TensorInfo(t.name + ".in_sum2", (1, sums.size), 0, sums.nbytes),
                  gguf.TensorInfo(t.name + ".counts", (1, 1), 0, 4)]
        data += [sums, counts]
    meta = {"general.type": gguf.string("imatrix"), "imatrix.datasets": gguf.array(gguf.STRING, ["random"]),
            "imatrix.chunk_count": gguf.u32(8), "imatrix.chunk_size": gguf.u32(512)}
    writer = gguf.Writer(path, meta, infos)
    for info, d in zip(infos, data):
        writer.write(info.name, d)
    writer.close()
    return values


@pytest.mark.parametrize("ftype", ["q4_0", "q4_k_m"])  # every type's imatrix path: test_quants.py
def test_importance_matrix(ftype, wide_checkpoints, f32_files, llama_cpp, tmp_path):
    values = _imatrix_file(tmp_path / "imatrix.gguf", f32_files("llama"))
    _compare("llama", ftype, wide_checkpoints, f32_files, llama_cpp, tmp_path,
             imatrix_file=tmp_path / "imatrix.gguf", imatrix=values)


def test_mix_rules_are_exercised(wide_checkpoints, f32_files, tmp_path):
    """The models above are big enough that the mixes differ from the plain types."""
    art = compiler.compile(str(wide_checkpoints("llama")), emit="gguf", quantize="q4_k_m",
                           output=tmp_path / "a", verify=False)
    types = art.manifest["backend"]["tensor_types"]
    assert types.get("Q6_K", 0) > 1 and types.get("Q4_K", 0) > 1, types
    report = art.quantization
    assert report["tensors"]["blk.0.ffn_down.weight"] == "Q6_K"  # use_more_bits(0, 8)
    assert report["tensors"]["blk.1.ffn_down.weight"] == "Q4_K"
    assert report["tensors"]["blk.3.ffn_down.weight"] == "Q6_K"  # (3 - 1) % 3 == 2
