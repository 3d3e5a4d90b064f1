"""External params as a TVM tensor cache: ``params/tensor-cache.json`` + ``params/params_shard_N.bin``.

The format MLC's weight loader reads (``tvm.contrib.tvmjs``: raw records,
md5 per shard), so an MLC-style package builds on it; the TVM runtime loads it
itself (``vm.builtin.tensor_cache.load``), which the emulator's C loader uses.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import ArtifactError
from targets.tvm import _env

PARAMS_DIR = "params"
INDEX = "tensor-cache.json"
#: shard size in MB (MLC's default is 32)
SHARD_MB = 32


def write(arrays: Mapping[str, np.ndarray], out_dir: Path) -> list[str]:
    """Write the params; returns the file names relative to ``out_dir``."""
    _env.tvm()
    from tvm.contrib import tvmjs

    folder = out_dir / PARAMS_DIR
    with contextlib.redirect_stdout(io.StringIO()):  # dump_tensor_cache prints its progress
        tvmjs.dump_tensor_cache(dict(arrays), str(folder), encode_format="raw", shard_cap_mb=SHARD_MB,
                                show_progress=False)
    (folder / "tensor-cache-b16.json").unlink(missing_ok=True)
    index = json.loads((folder / INDEX).read_text())
    files = [f"{PARAMS_DIR}/{INDEX}"] + [f"{PARAMS_DIR}/{shard['dataPath']}" for shard in index["records"]]
    return files


def read(artifact_dir: Path, names: list[str], device: Any) -> list[Any]:
    """The params (TVM tensors on ``device``) in ``names`` order."""
    _env.tvm()
    from tvm.contrib import tvmjs

    folder = artifact_dir / PARAMS_DIR
    if not (folder / INDEX).is_file():
        raise ArtifactError(f"{artifact_dir}: {PARAMS_DIR}/{INDEX} is missing")
    loaded, _ = tvmjs.load_tensor_cache(str(folder), device)
    missing = [n for n in names if n not in loaded]
    if missing:
        raise ArtifactError(f"{artifact_dir}: params {', '.join(missing[:5])} are not in {PARAMS_DIR}/{INDEX}")
    return [loaded[n] for n in names]
