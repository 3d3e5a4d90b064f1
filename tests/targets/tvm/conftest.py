from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("tvm", reason="--emit tvm needs apache-tvm (pip install 'kiln[tvm]'; the test extra has it)")


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory) -> Path:
    """Where the model zoo's exports go, once per session."""
    return tmp_path_factory.mktemp("tvm-zoo")
