"""Quantization: schemes, calibration, the canonical quantized form, reports.

Quantization runs as its own driver stage after the -O pipeline (it needs
calibration data, not just the graph): ``quantize_model`` in
``passes.quantize.stage``. Scheme implementations live one per module.
"""

from passes.quantize.schemes import SCHEMES, Scheme, parse_scheme  # noqa: F401
