"""`kiln run --rpc HOST:PORT` runs an artifact through TVM's RPC server (here one on loopback)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import compiler

from .helpers import assert_matches, kiln, kiln_run, ort_run

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "models" / "tiny_cnn.onnx"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """tiny_cnn for this host with params outside the library, compiled once for the module."""
    out = tmp_path_factory.mktemp("rpc") / "art"
    return compiler.compile(str(EXAMPLE), emit="tvm", output=out, params="external", verify=False).path


@pytest.fixture
def rpc_server():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
                             "--port-end", str(port + 1)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        else:
            pytest.fail("the TVM RPC server did not start")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_run_through_rpc(tmp_path, rpc_server, artifact):
    inputs = {"image": np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    got = kiln_run(artifact, inputs, tmp_path, "--rpc", rpc_server)
    assert_matches(ort_run(EXAMPLE, inputs), got)


def test_unreachable_server_is_one_line(artifact):
    proc = kiln("run", str(artifact), "--rpc", f"127.0.0.1:{_free_port()}")
    assert proc.returncode == 1
    assert proc.stderr.startswith("kiln: error: cannot reach a TVM RPC server")


def test_bad_address(artifact):
    proc = kiln("run", str(artifact), "--rpc", "nohost")
    assert proc.returncode == 1 and "expected HOST:PORT" in proc.stderr
