from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "models" / "tiny_cnn.onnx"


def kiln(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the CLI as a user would (a fresh interpreter, the installed code)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "compiler.cli", *args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=300,
    )


@pytest.fixture
def example() -> Path:
    return EXAMPLE
