"""Targets: triple parsing and specs (``targets.triple``) and the emit backends.

Each backend is a module with ``legalize(model, spec) -> list[str]``,
``emit(model, spec, out_dir, options) -> EmitResult`` and
``load(artifact_dir, manifest) -> Runner``. Backends register by name here;
``kiln targets`` shows a spec's emit formats only when the backend exists.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from compiler.errors import TargetError

#: emit format -> module implementing it
BACKENDS: dict[str, str] = {
    "onnx": "targets.onnx",
    "gguf": "targets.gguf",
    "tvm": "targets.tvm",
    "mlc": "targets.mlc",
}
#: emit format -> the module its backend needs at run time (formats not listed need nothing beyond kiln's deps)
REQUIRES: dict[str, str] = {
    "tvm": "tvm",
    "mlc": "tvm",
}


def available_emits() -> list[str]:
    """The emit formats whose backend can run here (one whose library is not installed is left out)."""
    from importlib.util import find_spec

    return sorted(name for name in BACKENDS if name not in REQUIRES or find_spec(REQUIRES[name]) is not None)


def get_backend(emit: str) -> ModuleType:
    module = BACKENDS.get(emit)
    if module is None:
        raise TargetError(
            f"unknown emit format {emit!r}",
            hint=f"available: {', '.join(available_emits())}",
        )
    return importlib.import_module(module)
