"""`ttt-pipe train`."""

from __future__ import annotations

from jobs.console import fail


def command() -> None:
    """Not yet available."""
    raise fail("'ttt-pipe train' is not yet available in this version")
