"""Importers: turn what the user hands kiln into something the driver can compile.

``import_source`` picks by the source: a folder holding ``config.json`` is a Hugging
Face checkpoint, a ``.gguf`` file (or one starting with the GGUF magic) a GGUF
model — both give a ``Checkpoint`` — and anything else is ONNX (an ``onnx_ir.Model``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def import_source(source: Any) -> tuple[Any, str]:
    """(model, sha256 of the source): an ``onnx_ir.Model`` or a ``checkpoint.Checkpoint``."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir() and (path / "config.json").is_file():
            from compiler.importers.hf_checkpoint import import_checkpoint

            ck = import_checkpoint(path)
            return ck, ck.sha256
        if path.is_file() and (path.suffix == ".gguf" or _has_gguf_magic(path)):
            from compiler.importers.gguf_file import import_gguf

            ck = import_gguf(path)
            return ck, ck.sha256
    from compiler.importers.onnx_file import import_onnx

    return import_onnx(source)


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
