"""`ttt-pipe run`."""

from __future__ import annotations

from jobs.console import fail


def command() -> None:
    """Not yet available."""
    raise fail("'ttt-pipe run' is not yet available in this version")
