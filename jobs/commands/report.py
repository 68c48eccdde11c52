"""`ttt-pipe report`: accuracy table on the console, PNG plots and index.html on disk."""

from __future__ import annotations

import sys
from enum import Enum
from typing import Annotated

import typer

from jobs.console import cli_errors, console, err_console

__all__ = ["command", "TableFormat", "TableKind", "print_summary"]


class TableFormat(str, Enum):
    table = "table"
    markdown = "markdown"
    csv = "csv"


class TableKind(str, Enum):
    compare = "compare"
    steps = "steps"
    cost = "cost"
    streams = "streams"


def _print_with_legend(table, title: str) -> None:
    console.print(table.to_rich(title=title))
    for line in table.legend():
        console.print(f"  {line}", highlight=False, soft_wrap=True, style="dim")


def print_summary(summary, fmt: str = "table") -> None:
    """The table to stdout (pipeable for markdown/csv); missing shards, notes and where the
    report is to stderr. `ttt-pipe run` reuses this after its last stage. On a console,
    `compare` also prints the per-stream table (if any) and the cost table."""
    if fmt == "table":
        what = "Error" if summary.table.error else "Accuracy"
        if summary.shown == "steps":
            console.print(summary.steps.to_rich(
                title="Per-step curve: accuracy (%) at every step (gain: last step minus step 0)",
                max_width=console.width))
        if summary.shown == "compare":
            _print_with_legend(summary.table, f"{what} (%) side by side, gain over the unadapted model")
        if summary.shown in ("compare", "streams") and summary.streams is not None:
            _print_with_legend(summary.streams, f"{what} (%) per stream")
        if summary.shown in ("compare", "cost"):
            _print_with_legend(summary.cost, "Cost per method")
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
    error: Annotated[bool, typer.Option(
        "--error", help="Error rates (100 - accuracy, %) instead of accuracy, as papers report; "
        "gains stay accuracy gains (= error reductions).")] = False,
    table: Annotated[TableKind, typer.Option(
        "--table", "-t", case_sensitive=False,
        help="compare: methods side by side (console: also per stream and cost); steps: the "
        "per-step curve of every run; cost: time per sample and memory per actor; streams: "
        "one row per stream.")] = TableKind.compare,
) -> None:
    """Compare methods: tables on stdout, plots and a self-contained index.html on disk.

    The comparison shows every method at ONE step, its configured last step (never the best
    step on test labels), per corruption and severity with means over severities and
    corruptions, and per stream when the results have streams. Gain = accuracy over the
    unadapted model on the same shards: a results folder of method `source` given alongside
    (same shard names, sample counts and samples, else not compared, with a note); without
    one, episodic ttt/it3 fall back to their own step 0 (said in the caption) and other
    methods are not compared. Losses beyond 1 point are red and marked '!' (within +-1
    point: noise). The cost table gives adaptation ms per sample and peak memory per actor
    (n/a for results of older versions). Works on partial runs and names the missing shards."""
    from pipeline.report import build_report  # matplotlib is imported only when needed

    summary = build_report(results, out=out, fmt=fmt.value, error=error, show=table.value)
    print_summary(summary, fmt.value)
