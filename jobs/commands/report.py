"""`ttt-pipe report`: accuracy table on the console, PNG plots and index.html on disk."""

from __future__ import annotations

import sys
from enum import Enum
from typing import Annotated

import typer

from jobs.console import cli_errors, console, err_console

__all__ = ["command", "TableFormat", "print_summary"]


class TableFormat(str, Enum):
    table = "table"
    markdown = "markdown"
    csv = "csv"


def print_summary(summary, fmt: str = "table") -> None:
    """The table to stdout (pipeable for markdown/csv); missing shards, notes and where the
    report is to stderr. `ttt-pipe run` reuses this after its last stage."""
    if fmt == "table":
        console.print(summary.table.to_rich(title="Accuracy (%) by adaptation step",
                                           max_width=console.width))
    else:
        sys.stdout.write(summary.table_text)
        sys.stdout.flush()
    for path, missing in summary.missing.items():
        err_console.print(
            f"[yellow]partial results:[/] {path} is missing {len(missing)} shard(s): "
            f"{', '.join(missing)} (run still going or interrupted; rerun it to resume)",
            highlight=False, soft_wrap=True)
    for note in summary.notes:
        err_console.print(f"[dim]note:[/] {note}", highlight=False, soft_wrap=True)
    err_console.print(f"report: {summary.html} ({len(summary.files)} files)", highlight=False,
                      soft_wrap=True)


@cli_errors
def command(
    results: Annotated[list[str], typer.Argument(
        help="Results folder(s) of 'ttt-pipe adapt' (local path or s3://...); several to compare.",
        metavar="RESULTS...", show_default=False)],
    out: Annotated[str | None, typer.Option(
        "--out", "-o", help="Where to write the PNG plots and index.html (default: <first RESULTS>/report).",
        show_default=False)] = None,
    fmt: Annotated[TableFormat, typer.Option(
        "--format", "-f", help="Table format on stdout: a console table, or markdown/csv to pipe.",
        case_sensitive=False)] = TableFormat.table,
) -> None:
    """Print accuracy tables and write plots and index.html for results folders.

    Rows are corruption x severity, columns the accuracy at each step per method and the gain
    of the last step over step 0. Works on partial runs and names the missing shards."""
    from pipeline.report import build_report  # matplotlib is imported only when needed

    summary = build_report(results, out=out, fmt=fmt.value)
    print_summary(summary, fmt.value)
