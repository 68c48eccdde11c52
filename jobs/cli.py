"""The `ttt-pipe` command line: thin wrappers that parse, call one function, report."""

from __future__ import annotations

import typer

from jobs.commands import adapt, corrupt, report, run, train

__all__ = ["app", "main"]

app = typer.Typer(
    name="ttt-pipe",
    help="Distributed test-time adaptation (TTT, IT3) of PyTorch vision models on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("train")(train.command)
app.command("corrupt")(corrupt.command)
app.command("adapt")(adapt.command)
app.command("report")(report.command)
app.command("run")(run.command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
