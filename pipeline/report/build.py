"""build_report: results folders in, table + PNG plots + self-contained index.html out."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

from pipeline.errors import TTTPipeError
from pipeline.report import plots
from pipeline.report.html import render_html
from pipeline.report.samples import sample_grid
from pipeline.report.table import ComparisonTable, comparison_table
from pipeline import storage
from pipeline.results import Results, read_results

__all__ = ["FORMATS", "ReportSummary", "build_report", "format_table"]

log = logging.getLogger(__name__)

FORMATS = ("table", "markdown", "csv")
Format = Literal["table", "markdown", "csv"]


@dataclass(frozen=True)
class ReportSummary:
    table: ComparisonTable  # `.to_rich()` for a console, `.to_markdown()`, `.to_csv()`
    table_text: str  # the table in the requested format (plain text for "table")
    out_dir: str
    files: list[str]  # every file written (PNGs, index.html)
    missing: dict[str, list[str]] = field(default_factory=dict)  # results path -> missing shards
    notes: list[str] = field(default_factory=list)  # what the report could not show, and why

    @property
    def html(self) -> str:
        return storage.join(self.out_dir, "index.html")


def format_table(table: ComparisonTable, fmt: Format) -> str:
    if fmt == "markdown":
        return table.to_markdown()
    if fmt == "csv":
        return table.to_csv()
    if fmt == "table":
        return table.to_text()
    raise TTTPipeError(f"unknown format {fmt!r}; choose from: {', '.join(FORMATS)}")


def build_report(results_uris: list[str] | str, out: str | None = None,
                 fmt: Format = "table") -> ReportSummary:
    """Read results folders (complete or partial), write PNG plots and index.html to `out`
    (default `<first results>/report`), and return the table in `fmt`."""
    uris = [results_uris] if isinstance(results_uris, str) else [str(u) for u in results_uris]
    if not uris:
        raise TTTPipeError("no results folder given; pass one or more --out folders of 'ttt-pipe adapt'")
    if fmt not in FORMATS:
        raise TTTPipeError(f"unknown format {fmt!r}; choose from: {', '.join(FORMATS)}")
    results: list[Results] = [read_results(u) for u in uris]
    out_dir = str(out) if out else storage.join(uris[0].rstrip("/"), "report")
    labelled = [r for r in results if r.labelled]
    table = comparison_table(labelled)
    series = table.series
    notes = [f"{r.path} has no run.json: cannot tell whether shards are missing"
             for r in results if not r.run]
    notes += [f"{r.path}: no labels (unlabelled data): its predictions are written, accuracy "
              "is left out of the table and plots" for r in results if not r.labelled]

    figures: list[tuple[str, str, str, bytes]] = [] if not series else [
        ("accuracy_vs_steps.png", "Accuracy vs adaptation steps",
         "One panel per corruption; colour = severity, line style = method/run.",
         plots.accuracy_vs_steps(series)),
        ("batch_accuracy_boxplot.png", "Per-batch accuracy: not adapted vs adapted",
         "Each box is the distribution of accuracy over adaptation batches (orange: median, "
         "red dashed: mean), as in the IT3 tutorial.", plots.batch_boxplots(series)),
        ("gain_per_corruption.png", "Mean gain per corruption",
         "Accuracy at the last step minus step 0, averaged over severities.", plots.gain_bars(series)),
    ]
    shard_uris = list(dict.fromkeys(u for r in results for u in r.shard_uris))
    grid = sample_grid(shard_uris)
    notes += grid.notes
    if grid.png is not None:
        figures.append(("samples.png", "Sample images", "Clean vs corrupted test images "
                        "(highest severity of each corruption; pixels clipped to [0, 1] for display).",
                        grid.png))
    storage.makedirs(out_dir)
    files = []
    for name, _, _, png in figures:
        uri = storage.join(out_dir, name)
        storage.atomic_write_bytes(png, uri)
        files.append(uri)
    page = render_html(table.to_html(), [(t, c, png) for _, t, c, png in figures], results, notes)
    html_uri = storage.join(out_dir, "index.html")
    storage.atomic_write_bytes(page.encode("utf-8"), html_uri)
    files.append(html_uri)
    log.info("report written to %s (%d files)", out_dir, len(files))
    return ReportSummary(table=table, table_text=format_table(table, fmt), out_dir=out_dir,
                         files=files, missing={r.path: r.missing_shards for r in results
                                               if r.missing_shards}, notes=notes)
