"""Whether an MLC package can run on this machine (the loader runs packages natively, on the CPU)."""

from __future__ import annotations

from typing import Any


def problem(manifest: dict[str, Any]) -> str | None:
    """Why this package cannot run here (None when it can)."""
    from targets.triple import parse_triple
    from targets.tvm import _env

    target = manifest["target"]
    if target["device"] != "cpu":
        return f"a {target['device']} package: the loader runs MLC packages on this host's CPU only"
    triple = parse_triple(target["triple"])
    if triple.arch != _env.host_arch() or triple.platform != "linux":
        return f"built for {target['triple']}; this host is {_env.host_arch()}-linux"
    if manifest.get("entry", "").endswith(".tar"):
        return "the library is lib.tar (objects, not linked): link it on the target first"
    missing = _env.missing_cpu_features(target.get("tvm", {}).get("mattr", []))
    if missing:
        return f"needs CPU features this machine lacks: {', '.join(missing)}"
    return None
