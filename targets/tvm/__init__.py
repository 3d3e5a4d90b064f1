"""The TVM backend: ``--emit tvm`` compiles the IR with Apache TVM (Relax) into a library for the target.

Artifact: ``lib.so`` linked for the target (``lib.tar`` of objects when no
linker for the triple is installed), plus ``params/`` (a tensor cache:
``tensor-cache.json`` + ``params_shard_N.bin``) when ``params=external``.

- ``legalize`` lists every node TVM's ONNX frontend (plus kiln's own
  lowerings) cannot lower;
- ``emit`` lowers to Relax (``lower``), schedules (``schedule`` / ``tune``),
  builds and links (``build``, ``export``);
- ``load`` runs the artifact on this host (the Relax VM), under qemu with the
  target's TVM runtime (``emulate``), or on a device through TVM's RPC
  server (``rpc``).

TVM itself is imported lazily: ``kiln`` works without it, and ``kiln targets``
lists ``tvm`` only when it is installed.
"""

from targets.tvm.backend import RUN_OPTIONS, cannot_verify, emit, legalize, load

__all__ = ["RUN_OPTIONS", "cannot_verify", "emit", "legalize", "load"]
