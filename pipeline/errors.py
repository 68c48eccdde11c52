"""The one exception type for expected failures (bad input, missing data, bad artifacts)."""

__all__ = ["TTTPipeError"]


class TTTPipeError(Exception):
    """An expected failure. The message is one line: the problem, then the fix."""
