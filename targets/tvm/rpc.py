"""Run an artifact on a device through TVM's RPC server (``python -m tvm.exec.rpc_server`` on the device).

The library is uploaded into the server's temporary folder, loaded there,
and run by a Relax VM on the device's CPU; inputs and params travel over the
session, outputs come back as numpy arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from compiler.artifact import file_digest
from compiler.errors import ArtifactError, KilnError
from targets.tvm import _env, params
from targets.tvm.run import _first_line, flatten_outputs, name_outputs, ordered_inputs


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise KilnError(f"--rpc {text!r}: expected HOST:PORT, e.g. 192.168.1.20:9090")
    return host.strip("[]"), int(port)


class RpcRunner:
    def __init__(self, artifact_dir: Path, manifest: dict[str, Any], address: str) -> None:
        tvm = _env.tvm()
        from tvm import relax, rpc

        host, port = parse_address(address)
        if manifest["entry"] != "lib.so":
            raise ArtifactError(f"{artifact_dir}: only a linked lib.so can be sent over RPC (this artifact has objects)")
        if manifest["target"]["device"] != "cpu":
            raise ArtifactError(f"{artifact_dir}: kiln runs CPU artifacts over RPC (this one is for {manifest['target']['device']})")
        try:
            self.session = rpc.connect(host, port)
        except Exception as err:
            raise ArtifactError(f"cannot reach a TVM RPC server at {host}:{port}: {_first_line(err)}") from None
        lib = artifact_dir / manifest["entry"]
        remote_name = f"kiln-{file_digest(lib)[:16]}.so"
        try:
            self.session.upload(str(lib), target=remote_name)
            self.device = self.session.cpu()
            self.vm = relax.VirtualMachine(self.session.load_module(remote_name), self.device)
        except Exception as err:
            raise ArtifactError(f"the RPC server at {host}:{port} cannot load {lib.name}: {_first_line(err)}") from None
        backend = manifest["backend"]
        self.input_names = list(backend["inputs"])
        self.output_names = [o["name"] for o in manifest["signature"]["outputs"]]
        names = backend["params"].get("names", [])
        local = params.read(artifact_dir, names, tvm.cpu()) if names else []
        self.params = [tvm.runtime.tensor(p.numpy(), self.device) for p in local]
        self.main = self.vm["main"]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        tvm = _env.tvm()
        args = [tvm.runtime.tensor(x, self.device) for x in ordered_inputs(inputs, self.input_names)]
        try:
            result = self.main(*args, *self.params)
        except Exception as err:
            raise ArtifactError(f"the remote run failed: {_first_line(err)}") from None
        return name_outputs([t.numpy() for t in flatten_outputs(result)], self.output_names)
