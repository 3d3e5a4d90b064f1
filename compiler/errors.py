"""The errors kiln reports to a user.

Each subclass names what the user did wrong; the CLI prints ``str(err)`` as
one line (plus ``err.hint`` when set) and exits 1.
"""

from __future__ import annotations


class KilnError(Exception):
    """Base class of every error kiln reports to a user."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class ModelFormatError(KilnError):
    """The input is unreadable, corrupt, not a model, or hostile."""


class UnsupportedError(KilnError):
    """An op, dtype or architecture kiln (or the target) cannot handle."""


class PassError(KilnError):
    """A pass failed or left an invalid graph; names the pass and the pipeline so far."""


class TargetError(KilnError):
    """An unknown or malformed target triple, device, preset or emit format."""


class VerificationError(KilnError):
    """The IR breaks an invariant, or an artifact does not compute what the model computed."""


class ArtifactError(KilnError):
    """An artifact cannot be written, read or run (bad output path, damaged artifact)."""
