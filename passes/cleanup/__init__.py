"""Cleanup passes: the -O1 pipeline.

Importing this package registers eliminate-identity, fold-shapes,
fold-constants, cse, eliminate-dead, infer-types, simplify-reshape-shape and
simplify-shape-math.
"""

from passes.cleanup import (  # noqa: F401  (registers the passes)
    cse,
    eliminate_dead,
    eliminate_identity,
    fold_constants,
    fold_shapes,
    infer_types,
    reshape_shape,
    shape_math,
)
