"""Cleanup passes: the -O1 pipeline.

Importing this package registers eliminate-identity, fold-shapes,
fold-constants, cse and eliminate-dead.
"""

from passes.cleanup import (  # noqa: F401  (registers the passes)
    cse,
    eliminate_dead,
    eliminate_identity,
    fold_constants,
    fold_shapes,
)
