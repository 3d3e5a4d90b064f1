"""Open an MLC package and run it: md5-checked, memory-mapped weights handed to the compiled library.

``open_weights`` reads ``tensor-cache.json``, checks every shard's size and md5
(a missing or corrupt shard is an ArtifactError naming it), memory-maps the
shards (copy-on-write: the files are never written) and gives each parameter
to TVM without a copy (records start on 64-byte boundaries; others are copied).

Runners: ``LlmRunner`` (prefill / decode with a KV cache, greedy ``generate``)
for LLM packages, ``GraphRunner`` (``main(inputs..., params...)``) for packages
of ONNX graphs. Both satisfy ``targets.backend.Runner``.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import ArtifactError, KilnError
from targets.mlc import host, tensor_cache
from targets.mlc.modes import MODES


@dataclasses.dataclass
class Weights:
    index: tensor_cache.Index
    arrays: dict[str, np.ndarray]  # memory-mapped views
    seconds: float  # time to check and map


def open_weights(folder: Path, verify: bool = True) -> Weights:
    start = time.perf_counter()
    index = tensor_cache.read_index(folder)
    if verify:
        tensor_cache.verify(index)
    else:
        for shard in index.shards:
            if not (folder / shard["dataPath"]).is_file():
                raise ArtifactError(f"{folder}: weight shard {shard['dataPath']} is missing")
    return Weights(index, tensor_cache.map_arrays(index), time.perf_counter() - start)


def to_tvm(arrays: Mapping[str, np.ndarray], names: Sequence[str], device: Any) -> list[Any]:
    """The named arrays as TVM tensors on ``device``, in ``names`` order (zero-copy on the CPU when aligned)."""
    import tvm

    missing = [n for n in names if n not in arrays]
    if missing:
        raise ArtifactError(f"the weight cache lacks {len(missing)} parameter(s) the library needs, "
                            f"first {missing[0]}")
    out = []
    for name in names:
        array = arrays[name]
        if device.dlpack_device_type() == 1 and array.ctypes.data % tensor_cache.ALIGN == 0 and array.size:
            out.append(tvm.runtime.from_dlpack(array))
        else:
            out.append(tvm.runtime.tensor(array.copy(order="C"), device))
    return out


def load_library(path: Path, device: Any) -> Any:
    import tvm
    from tvm import relax

    if not path.is_file():
        raise ArtifactError(f"{path.parent}: the library {path.name} is missing")
    try:
        return relax.VirtualMachine(tvm.runtime.load_module(str(path)), device)
    except Exception as err:  # noqa: BLE001 (TVM raises its own error types)
        raise ArtifactError(f"{path}: the TVM runtime cannot load it: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(err).__name__


def _check_host(folder: Path, manifest: dict[str, Any] | None) -> None:
    if manifest is not None:
        why = host.problem(manifest)
        if why:
            raise ArtifactError(f"{folder}: cannot run it on this host: {why}")


# ------------------------------------------------------------------------ LLM


class LlmRunner:
    """An LLM package: ``prefill`` a prompt, ``decode`` token by token, ``generate`` greedily."""

    def __init__(self, folder: Path, manifest: dict[str, Any] | None = None, verify: bool = True) -> None:
        import tvm

        from targets.mlc.package import read_chat_config

        start = time.perf_counter()
        folder = Path(folder)
        _check_host(folder, manifest)
        self.folder = folder
        self.config = read_chat_config(folder)
        self.mode = MODES.get(self.config.get("quantization", ""))
        if self.mode is None:
            raise ArtifactError(f"{folder}: unknown quantization {self.config.get('quantization')!r}")
        self.weights = open_weights(folder, verify)
        self.device = tvm.cpu()
        lib = (manifest or {}).get("entry") or "lib.so"
        self.vm = load_library(folder / lib, self.device)
        self.params = to_tvm(self.weights.arrays, self.config["kiln_params"], self.device)
        functions = self.config["kiln_functions"]
        self._create, self._prefill, self._decode = (self.vm[functions[k]] for k in ("create_kv_cache", "prefill",
                                                                                       "decode"))
        self.vocab_size = int(self.config["vocab_size"])
        self.context = int(self.config["context_window_size"])
        self.chunk = int(self.config.get("prefill_chunk_size") or self.context)
        self.caches: Any = None
        self.length = 0
        self.load_seconds = time.perf_counter() - start

    def reset(self) -> None:
        """Start a new sequence (fresh KV caches)."""
        self.caches = tuple(self._create())
        self.length = 0

    def _call(self, fn: Any, tokens: Sequence[int]) -> np.ndarray:
        import tvm

        if self.length + len(tokens) > self.context:
            raise KilnError(f"the sequence would reach {self.length + len(tokens)} tokens; "
                            f"the model's context window is {self.context}")
        if any(not 0 <= t < self.vocab_size for t in tokens):
            raise KilnError(f"token ids must be in [0, {self.vocab_size})")
        ids = tvm.runtime.tensor(np.asarray([tokens], np.int32), self.device)
        total = self.length + len(tokens)
        try:
            # (logits, caches): the caches are the same objects, appended in place, so the handles
            # kept from reset() stay valid (unpacking the returned tuple costs more than the layer math)
            result = fn(ids, tvm.runtime.ShapeTuple([total]), *self.caches, *self.params)
        except Exception as err:  # noqa: BLE001
            raise ArtifactError(f"the library failed to run: {_first_line(err)}") from None
        self.length = total
        return result[0].numpy()[0]

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        """Append ``tokens`` (in chunks of ``prefill_chunk_size``); float32 logits [len(tokens), vocab]."""
        if self.caches is None:
            self.reset()
        if not tokens:
            raise KilnError("prefill needs at least one token")
        parts = [self._call(self._prefill, list(tokens[i:i + self.chunk])) for i in range(0, len(tokens), self.chunk)]
        return np.concatenate(parts)

    def decode(self, token: int) -> np.ndarray:
        """Append one token; float32 logits [vocab]."""
        if self.caches is None:
            self.reset()
        return self._call(self._decode, [int(token)])[0]

    def generate(self, prompt: Sequence[int], max_tokens: int, stop: Sequence[int] = ()) -> Generation:
        """Greedy decoding: up to ``max_tokens`` new tokens, stopping after one in ``stop``."""
        self.reset()
        # the token loop makes garbage-free calls; a full collection walks every object of the process
        # (TVM imports torch), which cost a third of the time per token when it ran mid-loop
        collecting = gc.isenabled()
        gc.disable()
        try:
            start = time.perf_counter()
            logits = self.prefill(list(prompt))[-1]
            prefill_s = time.perf_counter() - start
            out: list[int] = []
            rows: list[np.ndarray] = []
            start = time.perf_counter()
            while len(out) < max_tokens:
                token = int(np.argmax(logits))
                out.append(token)
                rows.append(logits)
                if token in stop or len(out) == max_tokens or self.length >= self.context:
                    break
                logits = self.decode(token)
            decode_s = time.perf_counter() - start
        finally:
            if collecting:
                gc.enable()
        return Generation(list(prompt), out, np.stack(rows) if rows else np.zeros((0, self.vocab_size), np.float32),
                          prefill_s, decode_s)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``kiln run``: ``input_ids`` [1, n] -> ``logits`` [1, n, vocab] from an empty cache."""
        if "input_ids" not in inputs:
            raise ArtifactError("missing input input_ids")
        ids = np.asarray(inputs["input_ids"])
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise KilnError(f"input_ids must be [1, tokens], got {list(ids.shape)}")
        self.reset()
        return {"logits": self.prefill([int(t) for t in ids[0]])[None]}


@dataclasses.dataclass
class Generation:
    prompt: list[int]
    tokens: list[int]  # the generated tokens
    logits: np.ndarray  # [len(tokens), vocab]: the logits each token was chosen from
    prefill_seconds: float
    decode_seconds: float

    @property
    def decode_tokens_per_second(self) -> float:
        steps = len(self.tokens) - 1  # the first token comes from the prefill's logits
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0


# ---------------------------------------------------------------------- graphs


class GraphRunner:
    """A package of an ONNX graph: ``main(inputs..., params...)``."""

    def __init__(self, folder: Path, manifest: dict[str, Any], verify: bool = True) -> None:
        import tvm

        start = time.perf_counter()
        folder = Path(folder)
        _check_host(folder, manifest)
        backend = manifest["backend"]
        self.input_names = list(backend["inputs"])
        self.output_names = [o["name"] for o in manifest["signature"]["outputs"]]
        self.weights = open_weights(folder, verify)
        self.device = tvm.cpu()
        self.vm = load_library(folder / manifest["entry"], self.device)
        self.params = to_tvm(self.weights.arrays, backend["params"], self.device)
        self.main = self.vm["main"]
        self.load_seconds = time.perf_counter() - start

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tvm

        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ArtifactError(f"missing input(s) {', '.join(missing)}")
        args = [tvm.runtime.tensor(np.asarray(inputs[n]).copy(order="C"), self.device) for n in self.input_names]
        try:
            result = self.main(*args, *self.params)
        except Exception as err:  # noqa: BLE001
            raise ArtifactError(f"the library failed to run: {_first_line(err)}") from None
        flat = _flatten(result)
        if len(flat) != len(self.output_names):
            raise ArtifactError(f"the library returned {len(flat)} output(s); the signature has "
                                f"{len(self.output_names)}")
        return {name: t.numpy() for name, t in zip(self.output_names, flat)}


def _flatten(result: Any) -> list[Any]:
    if hasattr(result, "numpy"):
        return [result]
    out: list[Any] = []
    for item in result:
        out.extend(_flatten(item))
    return out


def load(folder: Path, manifest: dict[str, Any], verify: bool = True) -> LlmRunner | GraphRunner:
    """The runner for a package (``kiln run`` and ``compiler.load_artifact(...).run``)."""
    if manifest.get("backend", {}).get("kind") == "llm":
        return LlmRunner(folder, manifest, verify)
    return GraphRunner(folder, manifest, verify)
