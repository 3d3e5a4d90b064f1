"""Structured pruning on the IR: coupled channel groups, attention heads, FFN neurons, with reconstruction.

``options.py`` parses ``--prune``; ``groups.py`` finds the channel-coupled
groups; ``transformer.py`` labels attention heads and FFN groups and updates
the metadata; ``criteria.py`` scores and selects; ``apply.py`` rewrites;
``recover.py`` refits by least squares; ``stage.py`` ties them together and
reports (``pruning.json``).
"""

from passes.prune.options import PruneOptions, PruneSpecError, parse_prune
from passes.prune.stage import PruneReport, prune_model

__all__ = ["PruneOptions", "PruneReport", "PruneSpecError", "parse_prune", "prune_model"]
