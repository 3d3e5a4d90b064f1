"""The ``--prune`` spec: ``channels=0.3,heads=0.25,ffn=0.2,criterion=l2`` and its options.

Keys (every one optional, at least one ratio > 0):

- ``channels=R``: share of the channels of each prunable convolution / linear
  channel group to remove (CNN channels, and linear layers outside transformers);
- ``heads=R``: share of the attention heads (whole KV groups under GQA);
- ``ffn=R``: share of the intermediate neurons of transformer feed-forward blocks;
- ``hidden=R``: share of a transformer's hidden size (the residual stream: embedding
  columns, every norm's scale and bias, the input rows of the projections reading
  it and the output columns of those writing it); the norms then average over
  fewer channels, which ``--prune-recover lstsq`` compensates; a graph output
  that carries it keeps its size (pruned positions hold the final norm's bias);
- ``criterion=l1|l2|bn-gamma|activation``: how channels are ranked (default l2);
- ``scope=local|global``: the ratio per layer group, or one threshold over all
  groups of a kind (default local);
- ``round-to=N``: kept channel counts are multiples of N (default: from the
  target's SIMD width, see ``criteria.default_round_to``);
- ``protect=first+last+NODE...``: layers whose output channels are never
  pruned (their inputs may still shrink with the layers before them, as
  Torch-Pruning's ``ignored_layers``): ``first`` (layers reading a graph
  input: the stem) and ``last`` (layers whose output reaches a graph output:
  the classifier, whose outputs the model's output shape fixes anyway) by
  default; ``protect=none`` drops that default;
- ``max-ratio=R``: the most a global threshold may take from one group (default 0.9).
"""

from __future__ import annotations

import dataclasses
import difflib

from compiler.errors import KilnError

CRITERIA = ("l1", "l2", "bn-gamma", "activation")
SCOPES = ("local", "global")
RECOVERY = ("none", "lstsq")
KEYS = ("channels", "heads", "ffn", "hidden", "criterion", "scope", "round-to", "protect", "max-ratio")


class PruneSpecError(KilnError):
    """A malformed --prune spec (the message names the bad part)."""


@dataclasses.dataclass(frozen=True)
class PruneOptions:
    channels: float = 0.0
    heads: float = 0.0
    ffn: float = 0.0
    hidden: float = 0.0
    criterion: str = "l2"
    scope: str = "local"
    #: None: from the target spec
    round_to: int | None = None
    protect_first: bool = True
    protect_last: bool = True
    #: node names whose channels are never pruned
    protect: tuple[str, ...] = ()
    max_ratio: float = 0.9
    recover: str = "none"

    def ratio(self, kind: str) -> float:
        return {"channels": self.channels, "heads": self.heads, "ffn": self.ffn, "hidden": self.hidden}[kind]

    @property
    def needs_calibration(self) -> bool:
        return self.criterion == "activation" or self.recover != "none"

    def spec(self) -> str:
        parts = [f"{k}={getattr(self, k):g}" for k in ("channels", "heads", "ffn", "hidden") if getattr(self, k)]
        parts.append(f"criterion={self.criterion}")
        if self.scope != "local":
            parts.append(f"scope={self.scope}")
        if self.round_to is not None:
            parts.append(f"round-to={self.round_to}")
        protect = [p for p, on in (("first", self.protect_first), ("last", self.protect_last)) if on]
        protect += list(self.protect)
        if protect != ["first", "last"]:
            parts.append(f"protect={'+'.join(protect) or 'none'}")
        if self.max_ratio != 0.9:
            parts.append(f"max-ratio={self.max_ratio:g}")
        return ",".join(parts)


def parse_prune(text: str, recover: str | None = None) -> PruneOptions:
    """Parse a --prune spec (and the --prune-recover method); PruneSpecError names the bad part."""
    where = f"--prune {text!r}"
    values: dict[str, object] = {}
    for raw in (text or "").split(","):
        part = raw.strip()
        if not part:
            continue
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not value:
            raise PruneSpecError(f"{where}: {part!r} is not KEY=VALUE", hint=_keys_hint())
        if key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            raise PruneSpecError(f"{where}: unknown key {key!r}" + (f" (did you mean {close[0]}?)" if close else ""),
                                 hint=_keys_hint())
        if key in values:
            raise PruneSpecError(f"{where}: {key!r} is given twice")
        values[key] = _convert(where, key, value)
    protect = values.pop("protect", None)
    kwargs = {k.replace("-", "_"): v for k, v in values.items()}
    if protect is not None:
        names = list(protect)  # type: ignore[arg-type]
        kwargs["protect_first"] = "first" in names
        kwargs["protect_last"] = "last" in names
        kwargs["protect"] = tuple(n for n in names if n not in ("first", "last", "none"))
    method = (recover or "none").strip()
    if method not in RECOVERY:
        raise PruneSpecError(f"--prune-recover {method!r}: expected one of {', '.join(RECOVERY)}")
    options = PruneOptions(**kwargs, recover=method)  # type: ignore[arg-type]
    if not (options.channels or options.heads or options.ffn or options.hidden):
        raise PruneSpecError(f"{where}: nothing to prune: give channels=, heads=, ffn= or hidden= a ratio above 0",
                             hint=_keys_hint())
    return options


def _convert(where: str, key: str, value: str) -> object:
    if key in ("channels", "heads", "ffn", "hidden", "max-ratio"):
        try:
            ratio = float(value)
        except ValueError:
            raise PruneSpecError(f"{where}: {key}={value!r} is not a number") from None
        if not 0.0 <= ratio < 1.0 or (key == "max-ratio" and ratio == 0.0):
            raise PruneSpecError(f"{where}: {key}={value} must be in [0, 1)" + (" and above 0" if key == "max-ratio" else ""))
        return ratio
    if key == "criterion":
        if value not in CRITERIA:
            close = difflib.get_close_matches(value, CRITERIA, n=1)
            raise PruneSpecError(f"{where}: unknown criterion {value!r}" + (f" (did you mean {close[0]}?)" if close else ""),
                                 hint=f"criteria: {', '.join(CRITERIA)}")
        return value
    if key == "scope":
        if value not in SCOPES:
            raise PruneSpecError(f"{where}: scope={value!r}: expected local or global")
        return value
    if key == "round-to":
        if not value.isdigit() or int(value) < 1:
            raise PruneSpecError(f"{where}: round-to={value!r} must be a positive integer")
        return int(value)
    # protect
    names = [n.strip() for n in value.split("+")]
    if any(not n for n in names) or ("none" in names and len(names) > 1):
        raise PruneSpecError(f"{where}: protect={value!r}: expected none or NAME+NAME... (first, last, node names)")
    return tuple(names)


def _keys_hint() -> str:
    return ("keys: channels=R, heads=R, ffn=R, hidden=R (ratios in [0, 1)), criterion=" + "|".join(CRITERIA)
            + ", scope=local|global, round-to=N, protect=first+last+NODE|none, max-ratio=R")
