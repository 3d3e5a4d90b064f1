"""kiln: a model compiler. ``compiler.compile(model, target=..., emit=...)`` is the Python API."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["Artifact", "__version__", "compile", "load_artifact"]


def __getattr__(name: str) -> Any:
    # Lazy so that `import compiler.passes` does not pull in the whole driver.
    if name in ("Artifact", "compile", "load_artifact"):
        from compiler import api

        return getattr(api, name)
    raise AttributeError(f"module 'compiler' has no attribute {name!r}")
