"""The `ttt-pipe` command line: thin wrappers that parse, call one function, report."""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

from jobs.commands import adapt, corrupt, import_corrupted, import_model, report, run, train
from jobs.console import fail

__all__ = ["app", "main"]

class OneLineErrorGroup(TyperGroup):
    """Usage errors (bad option values, unknown choices) as one `error:` line, exit code 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # Typer vendors click: its own exception types
            message = exc.format_message().replace("Value error, ", "")
            if not message:  # `ttt-pipe` alone: the help was printed, nothing went wrong
                sys.exit(0)
            ctx = getattr(exc, "ctx", None)
            where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            fail(message + where)
            sys.exit(getattr(exc, "exit_code", 2))
        except typer.Abort:
            fail("aborted")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=OneLineErrorGroup,
    name="ttt-pipe",
    help="Distributed test-time adaptation (TTT, IT3) of PyTorch vision models on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("train")(train.command)
app.command("corrupt")(corrupt.command)
app.command("import-corrupted")(import_corrupted.command)
app.command("adapt")(adapt.command)
app.command("report")(report.command)
app.command("run")(run.command)
app.command("import-model")(import_model.command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
