"""Input/output signatures: for manifests, `kiln inspect`, seeded random inputs and input checks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from compiler.errors import KilnError


def describe_value(value: ir.Value) -> dict[str, Any]:
    """{name, dtype, shape} with numpy dtype names; symbolic dims as strings, unknown as null."""
    entry: dict[str, Any] = {"name": value.name}
    typ = value.type
    if isinstance(typ, ir.TensorType):
        entry["dtype"] = dtype_name(typ.dtype)
    elif typ is None:
        entry["dtype"] = None
    else:
        entry["type"] = str(typ)
        entry["dtype"] = None
    shape = value.shape
    entry["shape"] = None if shape is None else [_dim(d) for d in shape]
    return entry


def signature(model: ir.Model) -> dict[str, list[dict[str, Any]]]:
    initializers = set(model.graph.initializers)
    return {
        # Inputs that are also initializers are overridable weights, not data inputs.
        "inputs": [describe_value(v) for v in model.graph.inputs if v.name not in initializers],
        "outputs": [describe_value(v) for v in model.graph.outputs],
    }


def dtype_name(dtype: ir.DataType) -> str:
    try:
        return np.dtype(dtype.numpy()).name
    except Exception:
        return dtype.name.lower()


def _dim(d: Any) -> int | str | None:
    if isinstance(d, int):
        return d
    value = getattr(d, "value", None)
    return value if isinstance(value, (int, str)) else None


def random_inputs(
    inputs: list[dict[str, Any]], seed: int = 0, dims: Mapping[str, int] | None = None
) -> dict[str, np.ndarray]:
    """Seeded random arrays for a signature's inputs; symbolic dims take ``dims`` or 1."""
    import ml_dtypes  # noqa: F401  (registers bfloat16/float8 with numpy)

    rng = np.random.default_rng(seed)
    dims = dict(dims or {})
    arrays: dict[str, np.ndarray] = {}
    for entry in inputs:
        name = entry["name"]
        if entry.get("dtype") is None:
            raise KilnError(
                f"cannot make a random value for input {name!r} of type {entry.get('type', 'unknown')}",
                hint="pass the inputs with --inputs FILE.npz",
            )
        shape = tuple(_concrete(d, dims) for d in (entry["shape"] or []))
        dtype = np.dtype(entry["dtype"]) if entry["dtype"] != "bfloat16" else np.dtype("bfloat16")
        arrays[name] = _random_array(rng, shape, dtype, name)
    return arrays


def _concrete(d: Any, dims: Mapping[str, int]) -> int:
    if isinstance(d, int):
        return d
    if isinstance(d, str) and d in dims:
        return int(dims[d])
    return 1


def _random_array(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype, name: str) -> np.ndarray:
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        return rng.integers(0, 4, size=shape).astype(dtype)
    if dtype.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    if dtype.kind in "fV" or dtype.name in ("bfloat16",) or dtype.name.startswith("float8"):
        return rng.standard_normal(shape).astype(np.float32).astype(dtype)
    if dtype.kind in "OUS":
        return np.array(rng.choice(["a", "bb", "ccc"], size=shape), dtype=object)
    raise KilnError(f"cannot make a random value of dtype {dtype} for input {name!r}")


def check_inputs(inputs: Mapping[str, np.ndarray], expected: list[dict[str, Any]], where: str) -> dict[str, np.ndarray]:
    """Match given arrays to the signature: names, dtypes and static dims; one clear error."""
    names = [e["name"] for e in expected]
    missing = [n for n in names if n not in inputs]
    extra = [n for n in inputs if n not in names]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(map(repr, missing))}")
        if extra:
            parts.append(f"unexpected {', '.join(map(repr, extra))}")
        raise KilnError(
            f"{where}: inputs do not match the signature ({'; '.join(parts)})",
            hint=f"expected inputs: {', '.join(names)}",
        )
    out = {}
    for entry in expected:
        value = inputs[entry["name"]]
        if "type" in entry:  # sequence/optional/map inputs pass through as given
            out[entry["name"]] = value
            continue
        array = np.asarray(value)
        want = entry.get("dtype")
        if want is not None and array.dtype.name != want and not (
            want in ("str", "object") or array.dtype.kind in "OUS"
        ):
            raise KilnError(f"{where}: input {entry['name']!r} is {array.dtype.name}, the model takes {want}")
        shape = entry.get("shape")
        if shape is not None:
            if len(shape) != array.ndim or any(
                isinstance(d, int) and d != s for d, s in zip(shape, array.shape)
            ):
                raise KilnError(
                    f"{where}: input {entry['name']!r} has shape {list(array.shape)}, the model takes {shape}"
                )
        out[entry["name"]] = array
    return out
