"""kiln's built-in passes; importing this package registers them all."""

from passes import cleanup, fusion  # noqa: F401
