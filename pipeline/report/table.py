"""The comparison table: rows corruption x severity (+ a mean row), columns accuracy per step
of each series (a method in a results folder) and the gain of its last step over step 0."""

from __future__ import annotations

import csv
import html
import io
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

from pipeline.results import Results

__all__ = ["Series", "Row", "ComparisonTable", "series_of", "comparison_table", "console_text",
           "csv_text", "markdown_lines", "CLEAN"]

CLEAN = "identity"  # the clean baseline corruption, written at severity 0


@dataclass(frozen=True)
class Series:
    """One method of one results folder: a group of table columns, one line style in plots."""

    label: str
    method: str
    results: Results

    @cached_property
    def accuracy(self) -> dict[tuple[str, int, int], float]:
        """(corruption, severity, step) -> accuracy for this series. Rows that differ in
        another key (a `stream` column) are pooled, weighted by their sample counts."""
        pooled: dict[tuple[str, int, int], list[float]] = {}
        for r in self.results.accuracy.to_pylist():
            if r["method"] == self.method and r["accuracy"] is not None:
                acc = pooled.setdefault((r["corruption"], r["severity"], r["step"]), [0.0, 0, []])
                acc[0] += r["accuracy"] * r["n"]
                acc[1] += r["n"]
                acc[2].append(r["accuracy"])
        # one row: its accuracy exactly as stored; several: the n-weighted mean
        return {k: v[2][0] if len(v[2]) == 1 else v[0] / v[1] for k, v in pooled.items()}

    @cached_property
    def steps(self) -> list[int]:
        return sorted({k[2] for k in self.accuracy})

    @property
    def last_step(self) -> int:
        return self.steps[-1] if self.steps else 0


def series_of(results: list[Results]) -> list[Series]:
    """One series per (results folder, method). Labels are the method name; when a method
    appears in several folders, `method (folder name)`; still ambiguous -> `method (#i)`."""
    pairs = [(r, m) for r in results for m in r.methods]
    by_method = Counter(m for _, m in pairs)
    labels = [m if by_method[m] == 1 else f"{m} ({r.name})" for r, m in pairs]
    counts = Counter(labels)
    seen: Counter = Counter()
    unique = []
    for label in labels:
        if counts[label] > 1:
            seen[label] += 1
            label = f"{label} #{seen[label]}"
        unique.append(label)
    return [Series(label, m, r) for label, (r, m) in zip(unique, pairs)]


@dataclass(frozen=True)
class Row:
    corruption: str  # "mean" for the mean row
    severity: int | None  # None for the mean row
    values: list[float | None]  # aligned with ComparisonTable.columns; fractions, gains too

    @property
    def is_mean(self) -> bool:
        return self.severity is None


@dataclass(frozen=True)
class ComparisonTable:
    series: list[Series]
    columns: list[tuple[Series, int | None]]  # (series, step) or (series, None) for the gain
    rows: list[Row]  # corruption x severity rows, then the mean row

    def header(self) -> list[str]:
        return ["corruption", "severity"] + [
            f"{s.label} step {k}" if k is not None else f"{s.label} gain" for s, k in self.columns]

    def cells(self, row: Row, digits: int = 1, percent: bool = True) -> list[str]:
        """Row as text: accuracy in % (gain in percentage points, signed), '-' when absent."""
        sev = "" if row.is_mean else str(row.severity)
        out = [row.corruption, sev]
        for (_, step), v in zip(self.columns, row.values):
            if v is None:
                out.append("-")
                continue
            x = 100 * v if percent else v
            out.append(f"{x:+.{digits}f}" if step is None else f"{x:.{digits}f}")
        return out

    def to_markdown(self) -> str:
        lines = markdown_lines(self.header(), [(self.cells(r), r.is_mean) for r in self.rows], left=1)
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        """Accuracy and gain in percent (3 decimals); empty cells where a value is absent."""
        rows = ([r.corruption, "" if r.is_mean else r.severity,
                 *("" if v is None else f"{100 * v:.3f}" for v in r.values)] for r in self.rows)
        return csv_text(self.header(), rows)

    def to_html(self) -> str:
        head = self.header()
        parts = ["<table>", "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head)
                 + "</tr></thead>", "<tbody>"]
        for row in self.rows:
            cls = ' class="mean"' if row.is_mean else ""
            tds = []
            for i, c in enumerate(self.cells(row)):
                step = self.columns[i - 2][1] if i >= 2 else 0
                kind = ""
                if step is None and c not in ("-", ""):
                    kind = ' class="up"' if c.startswith("+") and float(c) > 0 else (
                        ' class="down"' if float(c) < 0 else "")
                tds.append(f"<td{kind}>{html.escape(c)}</td>")
            parts.append(f"<tr{cls}>" + "".join(tds) + "</tr>")
        parts += ["</tbody>", "</table>"]
        return "\n".join(parts)

    def to_rich(self, title: str | None = None, max_width: int | None = None):
        """A rich Table (a renderable; the caller prints it). Narrow headers: one series ->
        `step k`, with the method in the title; several -> `A step k`, with a legend below.
        Wider than `max_width` -> only step 0, the last step and the gain of each series."""
        from rich import box
        from rich.table import Table

        single = len(self.series) == 1
        codes = {s.label: _code(i) for i, s in enumerate(self.series)}
        keep = list(range(len(self.columns)))
        notes = [] if single else ["  ".join(f"{codes[s.label]} = {s.label}" for s in self.series)]
        name_width = max(len(r.corruption) for r in self.rows) + 3
        if max_width and name_width + 6 + 9 * len(keep) > max_width:
            keep = [i for i, (s, k) in enumerate(self.columns) if k in (None, s.steps[0], s.last_step)]
            if len(keep) < len(self.columns):
                notes.append("intermediate steps left out to fit the terminal "
                             "(all steps: --format markdown/csv or index.html)")
        if single:
            title = f"{title or 'Accuracy (%)'}: {self.series[0].label}"
        table = Table(title=title, caption="\n".join(notes) or None, header_style="bold",
                      caption_justify="left", box=box.SIMPLE_HEAVY, show_edge=False)
        table.add_column("corruption", no_wrap=True)
        table.add_column("sev", justify="right", no_wrap=True)
        for i in keep:
            s, k = self.columns[i]
            prefix = "" if single else f"{codes[s.label]}\n"
            table.add_column(f"{prefix}step {k}" if k is not None else f"{prefix}gain",
                             justify="right", min_width=5, overflow="fold")
        for row in self.rows:
            cells = self.cells(row)
            styled = cells[:2]
            for i in keep:
                c = cells[i + 2]
                if self.columns[i][1] is None and c != "-":
                    c = f"[green]{c}[/]" if float(c) > 0 else (f"[red]{c}[/]" if float(c) < 0 else c)
                styled.append(c)
            table.add_row(*styled, style="bold" if row.is_mean else None,
                          end_section=len(self.rows) > 1 and row is self.rows[-2])
        return table

    def to_text(self, width: int = 160) -> str:
        """The rich table rendered to plain text (no colour codes)."""
        return console_text(self.to_rich(max_width=width), width=width)


def markdown_lines(head: list[str], rows: Iterable[tuple[list[str], bool]], left: int) -> list[str]:
    """A Markdown table's lines: `head`, then each row's cells (bold when its flag is set, e.g.
    a mean row); the first `left` columns left-aligned, the numbers right-aligned."""
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join([":---"] * left + ["---:"] * (len(head) - left)) + "|"]
    for cells, bold in rows:
        if bold:
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def csv_text(head: list[str], rows: Iterable[list]) -> str:
    """`head`, then `rows`, as CSV text (newline line ends on every platform)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(head)
    writer.writerows(rows)
    return buf.getvalue()


def console_text(table, lines: Iterable[str] = (), width: int = 160) -> str:
    """A rich `table`, then `lines` (a legend, unhighlighted), as plain text (no colour codes).

    The one renderer behind every report table's `to_text()`: what the console shows, for
    files and tests.
    """
    from rich.console import Console

    console = Console(file=io.StringIO(), width=width, color_system=None, record=True)
    console.print(table)
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)
    return console.export_text()


def _code(i: int) -> str:
    """A, B, ..., Z, AA, AB, ...: short names for series in narrow console headers."""
    return (_code(i // 26 - 1) if i >= 26 else "") + chr(ord("A") + i % 26)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def comparison_table(results: list[Results]) -> ComparisonTable:
    series = series_of(results)
    acc = {s.label: s.accuracy for s in series}
    columns: list[tuple[Series, int | None]] = []
    for s in series:
        columns += [(s, k) for k in s.steps]
        if len(s.steps) > 1:
            columns.append((s, None))
    keys = sorted({(c, sev) for s in series for (c, sev, _) in acc[s.label]},
                  key=lambda cs: (cs[0] != CLEAN, cs[0], cs[1]))
    rows = []
    for corruption, severity in keys:
        values: list[float | None] = []
        for s, k in columns:
            a = acc[s.label]
            if k is None:
                first, last = a.get((corruption, severity, s.steps[0])), a.get((corruption, severity, s.last_step))
                values.append(None if first is None or last is None else last - first)
            else:
                values.append(a.get((corruption, severity, k)))
        rows.append(Row(corruption, severity, values))
    corrupted = [r for r in rows if r.corruption != CLEAN] or rows
    label = "mean" if corrupted is rows or not any(r.corruption == CLEAN for r in rows) else "mean (corrupted)"
    mean = [_mean([r.values[i] for r in corrupted if r.values[i] is not None]) for i in range(len(columns))]
    return ComparisonTable(series, columns, rows + [Row(label, None, mean)])
