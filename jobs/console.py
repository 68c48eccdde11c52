"""What the CLI shows a person: one-line errors, progress bars, tables."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from pipeline.errors import TTTPipeError

__all__ = ["console", "err_console", "fail", "cli_errors", "progress", "run_with_bar"]

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `error: message` on one line to stderr and return the Exit to raise."""
    line = " ".join(str(message).split())  # never more than one line
    err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
    return typer.Exit(code=code)


def cli_errors(fn: F) -> F:
    """Turn expected failures into a one-line error and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (TTTPipeError, ValueError, KeyError, FileNotFoundError, PermissionError) as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise fail(str(msg)) from None
        except KeyboardInterrupt:
            err_console.print("interrupted: rerun the same command to resume", highlight=False)
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def progress(transient: bool = False):
    """A rich progress bar that stays quiet when stdout is not a terminal."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err_console,
        transient=transient, disable=not sys.stderr.isatty(),
    )


def run_with_bar(label: str, total: int, run):
    """`run(advance)` under a progress bar of `total` steps; `advance(done, total, item)` is
    the (done, total, ...) callback the jobs take. Returns what `run` returns."""
    with progress() as bar:
        task = bar.add_task(label, total=total)

        def advance(done: int, total: int, *_) -> None:
            bar.update(task, completed=done, total=total)

        return run(advance)
