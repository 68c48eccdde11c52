"""build_report: results folders in, table + PNG plots + self-contained index.html out."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

from pipeline.errors import TTTPipeError
from pipeline.report import plots
from pipeline.report.compare import SideBySide, side_by_side, stream_table
from pipeline.report.costs import CostTable, cost_table
from pipeline.report.html import render_html
from pipeline.report.samples import sample_grid
from pipeline.report.table import ComparisonTable, comparison_table
from pipeline import storage
from pipeline.results import Results, read_results

__all__ = ["FORMATS", "TABLES", "ReportSummary", "build_report", "format_table"]

log = logging.getLogger(__name__)

FORMATS = ("table", "markdown", "csv")
Format = Literal["table", "markdown", "csv"]
# compare: methods side by side at their configured last step, gain over the unadapted model;
# steps: the per-step curve of every series; cost: time per sample, memory per actor;
# streams: one row per stream (when the accuracy rows carry a `stream` column)
TABLES = ("compare", "steps", "cost", "streams")


@dataclass(frozen=True)
class ReportSummary:
    table: SideBySide  # methods side by side; `.to_rich()`, `.to_markdown()`, `.to_csv()`
    steps: ComparisonTable  # the per-step curve
    cost: CostTable
    streams: SideBySide | None  # None when no accuracy row has a stream
    table_text: str  # the requested table in the requested format (plain text for "table")
    out_dir: str
    files: list[str]  # every file written (PNGs, index.html)
    missing: dict[str, list[str]] = field(default_factory=dict)  # results path -> missing shards
    notes: list[str] = field(default_factory=list)  # what the report could not show, and why
    shown: str = "compare"  # which of TABLES table_text holds

    @property
    def html(self) -> str:
        return storage.join(self.out_dir, "index.html")


def format_table(table, fmt: Format) -> str:
    """Any report table (side by side, per step, cost) in `fmt`."""
    if fmt == "markdown":
        return table.to_markdown()
    if fmt == "csv":
        return table.to_csv()
    if fmt == "table":
        return table.to_text()
    raise TTTPipeError(f"unknown format {fmt!r}; choose from: {', '.join(FORMATS)}")


def build_report(results_uris: list[str] | str, out: str | None = None,
                 fmt: Format = "table", error: bool = False, show: str = "compare") -> ReportSummary:
    """Read results folders (complete or partial), write PNG plots and index.html to `out`
    (default `<first results>/report`), and return the tables, `show` (one of TABLES) as
    text in `fmt`. `error`: error rates (100 - accuracy) in the side-by-side tables."""
    uris = [results_uris] if isinstance(results_uris, str) else [str(u) for u in results_uris]
    if not uris:
        raise TTTPipeError("no results folder given; pass one or more --out folders of 'ttt-pipe adapt'")
    if fmt not in FORMATS:
        raise TTTPipeError(f"unknown format {fmt!r}; choose from: {', '.join(FORMATS)}")
    if show not in TABLES:
        raise TTTPipeError(f"unknown table {show!r}; choose from: {', '.join(TABLES)}")
    results: list[Results] = [read_results(u) for u in uris]
    out_dir = str(out) if out else storage.join(uris[0].rstrip("/"), "report")
    labelled = [r for r in results if r.labelled]
    table = comparison_table(labelled)
    series = table.series
    compare = side_by_side(labelled, error=error)
    streams = stream_table(compare)
    cost = cost_table(series)
    if show == "streams" and streams is None:
        raise TTTPipeError("no accuracy row has a stream; these results hold i.i.d. shards: "
                           "use --table compare")
    notes = [f"{r.path} has no run.json: cannot tell whether shards are missing"
             for r in results if not r.run]
    notes += compare.notes
    notes += [f"{r.path}: no labels (unlabelled data): its predictions are written, accuracy "
              "is left out of the table and plots" for r in results if not r.labelled]

    heatmap = plots.gain_heatmap(compare) if series else None
    figures: list[tuple[str, str, str, bytes]] = [] if heatmap is None else [
        ("gain_heatmap.png", "Gain over the unadapted model",
         "Accuracy gain in points at each method's configured last step, per corruption and "
         "severity, with means; red: a loss beyond 1 point, grey: within +-1 point (noise), "
         "green: a gain beyond 1 point. Baselines as in the table's notes.", heatmap)]
    figures += [] if not series else [
        ("accuracy_vs_steps.png", "Per-step curve: accuracy vs adaptation steps",
         "Every step, for insight only: the tables show each method's configured last step, "
         "never the best step on test labels. One panel per corruption; colour = severity, "
         "line style = method/run.",
         plots.accuracy_vs_steps(series)),
        ("batch_accuracy_boxplot.png", "Per-batch accuracy: not adapted vs adapted",
         "Each box is the distribution of accuracy over adaptation batches (orange: median, "
         "red dashed: mean), as in the IT3 tutorial. Step 0 is the unadapted model only for "
         "episodic ttt/it3.", plots.batch_boxplots(series)),
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
    page = render_html(compare.to_html(), table.to_html(), cost.to_html(),
                       None if streams is None else streams.to_html(),
                       [(t, c, png) for _, t, c, png in figures], results, notes, error,
                       lead=int(heatmap is not None))
    html_uri = storage.join(out_dir, "index.html")
    storage.atomic_write_bytes(page.encode("utf-8"), html_uri)
    files.append(html_uri)
    log.info("report written to %s (%d files)", out_dir, len(files))
    shown = {"compare": compare, "steps": table, "cost": cost, "streams": streams}[show]
    return ReportSummary(table=compare, steps=table, cost=cost, streams=streams,
                         table_text=format_table(shown, fmt), out_dir=out_dir, shown=show,
                         files=files, missing={r.path: r.missing_shards for r in results
                                               if r.missing_shards}, notes=notes)
