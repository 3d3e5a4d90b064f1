"""A build script: compile the example model for two targets and check both artifacts.

Run: python examples/build_script.py [OUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import compiler

HERE = Path(__file__).parent


def main(out_dir: Path) -> None:
    image = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    for target in ("x86_64-linux-gnu", "android-arm64"):
        art = compiler.compile(HERE / "models" / "tiny_cnn.onnx", target=target, emit="onnx",
                               opt_level=2, output=out_dir / target)
        probs = art.run({"image": image})["probs"]
        print(f"{target}: {art.path} top-1 class {int(probs.argmax())}, verification {art.manifest['verification']}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("build"))
