"""`ttt-pipe adapt`."""

from __future__ import annotations

from jobs.console import fail


def command() -> None:
    """Not yet available."""
    raise fail("'ttt-pipe adapt' is not yet available in this version")
