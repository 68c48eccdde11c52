"""Methods side by side, the table a paper shows: every method at ONE fixed step (its
configured last step: `baseline.reported_step`), accuracy or error, and its gain over the
unadapted model on the same shards (`baseline.choose_baselines`).

Rows: every (stream, corruption, severity) cell; then, when there are several severities,
each corruption's mean over its severities and each severity's mean over corruptions; last
the mean over every corrupted cell (the clean `identity` cell is shown, never averaged in).
With a `stream` column in the accuracy rows, `stream_table` gives one row per stream.

No oracle: the step is fixed before looking at labels; the per-step curve (`table.py`,
`plots.accuracy_vs_steps`) is shown apart and labelled as such.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

from pipeline.gain import GAIN_NOISE, gain_class
from pipeline.report.baseline import Baseline, choose_baselines, reported_step
from pipeline.report.table import CLEAN, Series, _code, console_text, csv_text, markdown_lines, series_of
from pipeline.results import Results

__all__ = ["GAIN_NOISE", "gain_class", "Entry", "CompareRow", "SideBySide", "side_by_side",
           "stream_table"]

Key = tuple[str | None, str, int]  # (stream, corruption, severity)


def _cells(s: Series, step: int) -> dict[Key, float]:
    """(stream, corruption, severity) -> accuracy (fraction) of series `s` at `step`."""
    acc = s.results.accuracy
    has_stream = "stream" in acc.column_names
    return {(r["stream"] if has_stream else None, r["corruption"], r["severity"]): r["accuracy"]
            for r in acc.to_pylist()
            if r["method"] == s.method and r["step"] == step and r["accuracy"] is not None}


@dataclass(frozen=True)
class Entry:
    """One series in the table: the step shown and what its gain is measured against."""

    series: Series
    step: int
    baseline: Baseline
    values: dict[Key, float] = field(default_factory=dict)  # accuracy at `step`
    base: dict[Key, float] = field(default_factory=dict)    # the baseline's accuracy

    @property
    def label(self) -> str:
        return self.series.label

    def gain(self, key: Key) -> float | None:
        """Accuracy at `step` minus the baseline's on the same cell. A source run has no
        streams (it keeps no state), so a stream's cell is compared with its shard alone."""
        base = self.base.get(key, self.base.get((None, key[1], key[2])))
        if not self.baseline.compared or key not in self.values or base is None:
            return None
        return self.values[key] - base


@dataclass(frozen=True)
class CompareRow:
    stream: str | None
    corruption: str        # a corruption, "mean", or a stream's name in stream_table
    severity: str          # "5", "all" (a corruption's severities), "" (overall mean)
    kind: str              # "cell", "corruption", "severity", "mean", "stream"
    values: list[float | None]  # per entry: accuracy (fraction)
    gains: list[float | None]   # per entry: accuracy gain (fraction); None: not compared


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _aggregate(entries: list[Entry], keys: list[Key], **row) -> CompareRow:
    values = [_mean([e.values[k] for k in keys if k in e.values]) for e in entries]
    gains = [_mean([g for g in (e.gain(k) for k in keys) if g is not None]) for e in entries]
    return CompareRow(values=values, gains=gains, **row)


@dataclass(frozen=True)
class SideBySide:
    entries: list[Entry]
    rows: list[CompareRow]
    error: bool = False        # show error rates (100 - accuracy), as papers do
    notes: list[str] = field(default_factory=list)  # source runs not used, partial means

    @property
    def series(self) -> list[Series]:
        return [e.series for e in self.entries]

    @property
    def streams(self) -> bool:
        return any(r.stream is not None for r in self.rows)

    def _gain_column(self, e: Entry) -> bool:
        return e.baseline.kind != "self"

    def header(self) -> list[str]:
        what = "err" if self.error else "acc"
        head = (["stream"] if self.streams else []) + ["corruption", "severity"]
        for e in self.entries:
            head.append(f"{e.label} {what}")
            if self._gain_column(e):
                head.append(f"{e.label} gain")
        return head

    def caption(self) -> list[str]:
        lines = [f"{e.label}: step {e.step} (configured last step); "
                 + ("the unadapted model" if e.baseline.kind == "self" else
                    f"gain {e.baseline.why}") for e in self.entries]
        lines.append(f"{'error' if self.error else 'accuracy'} in %; gain = accuracy gain = error "
                     f"reduction, percentage points; ! (red): a loss beyond {GAIN_NOISE:g} point, "
                     f"within +-{GAIN_NOISE:g}: noise at these sample sizes; never the best step "
                     "on test labels (no oracle)")
        return lines

    def _value(self, v: float | None, digits: int) -> str:
        if v is None:
            return "-"
        return f"{(100 - 100 * v) if self.error else 100 * v:.{digits}f}"

    def cells(self, row: CompareRow, digits: int = 1, mark: bool = True) -> list[tuple[str, str | None]]:
        """(text, gain class or None) per column. `mark`: a loss gets a trailing '!'."""
        out: list[tuple[str, str | None]] = ([(row.stream or "", None)] if self.streams else [])
        out += [(row.corruption, None), (row.severity, None)]
        for e, v, g in zip(self.entries, row.values, row.gains):
            out.append((self._value(v, digits), None))
            if self._gain_column(e):
                cls = gain_class(None if g is None else 100 * g)
                text = "-" if g is None else f"{100 * g:+.{digits}f}" + ("!" if mark and cls == "loss" else "")
                out.append((text, cls))
        return out

    def _section_end(self, i: int) -> bool:
        return i + 1 < len(self.rows) and self.rows[i + 1].kind != self.rows[i].kind

    def to_markdown(self) -> str:
        lines = markdown_lines(self.header(), [([t for t, _ in self.cells(r)], r.kind == "mean")
                                               for r in self.rows], left=3 if self.streams else 2)
        lines += [""] + [f"- {c}" for c in self.caption()]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        """Numbers in percent (3 decimals); empty where absent; no markers, no caption."""
        rows = (["" if t == "-" else t for t, _ in self.cells(r, digits=3, mark=False)] for r in self.rows)
        return csv_text(self.header(), rows)

    def to_html(self) -> str:
        parts = ["<table>", "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in self.header())
                 + "</tr></thead>", "<tbody>"]
        for row in self.rows:
            cls = ' class="mean"' if row.kind == "mean" else ""
            tds = "".join(f"<td{f' class={k!r}' if k else ''}>{html.escape(t)}</td>"
                          for t, k in self.cells(row))
            parts.append(f"<tr{cls}>{tds}</tr>")
        parts += ["</tbody>", "</table>",
                  "<ul class='note'>" + "".join(f"<li>{html.escape(c)}</li>" for c in self.caption())
                  + "</ul>"]
        return "\n".join(parts)

    def to_rich(self, title: str | None = None):
        """Short column codes (A, B, ...) explained in the caption; loss cells white on red."""
        from rich import box
        from rich.table import Table

        codes = {e.label: _code(i) for i, e in enumerate(self.entries)}
        table = Table(title=title, header_style="bold", box=box.SIMPLE_HEAVY, show_edge=False)
        if self.streams:
            table.add_column("stream", no_wrap=True)
        table.add_column("corruption", no_wrap=True)
        table.add_column("sev", justify="right", no_wrap=True)
        what = "err" if self.error else "acc"
        for e in self.entries:
            table.add_column(f"{codes[e.label]}\n{what}", justify="right", min_width=5)
            if self._gain_column(e):
                table.add_column(f"{codes[e.label]}\ngain", justify="right", min_width=6)
        style = {"loss": "bold white on red", "gain": "green", "neutral": None, None: None}
        for i, row in enumerate(self.rows):
            cells = [f"[{style[k]}]{t}[/]" if style[k] else t for t, k in self.cells(row)]
            table.add_row(*cells, style="bold" if row.kind == "mean" else None,
                          end_section=self._section_end(i))
        return table

    def legend(self) -> list[str]:
        """The caption with the console's column codes: `A = ttt: step 3 ...`."""
        lines = self.caption()
        return [f"{_code(i)} = {line}" for i, line in enumerate(lines[:len(self.entries)])] + \
            lines[len(self.entries):]

    def to_text(self, width: int = 160) -> str:
        """The console table and its legend as plain text (no colour: losses keep their '!')."""
        return console_text(self.to_rich(), self.legend(), width)


def _entries(results: list[Results]) -> tuple[list[Entry], list[str]]:
    series = series_of([r for r in results if r.labelled])
    baselines, notes = choose_baselines(series)
    by_label = {s.label: s for s in series}
    entries = []
    for s in series:
        b = baselines[s.label]
        step = reported_step(s)
        base: dict = {}
        if b.kind == "source" and b.source is not None:
            src = by_label[b.source.label]
            base = _cells(src, reported_step(src))
        elif b.kind == "step0":
            base = _cells(s, 0)
        entries.append(Entry(s, step, b, _cells(s, step), base))
        if step not in s.steps:
            notes.append(f"{s.label}: no predictions at its configured step {step} "
                         f"(steps found: {', '.join(map(str, s.steps)) or 'none'})")
    return entries, notes


def _keys(entries: list[Entry]) -> list[Key]:
    keys = {k for e in entries for k in e.values}
    return sorted(keys, key=lambda k: (k[0] or "", k[1] != CLEAN, k[1], k[2]))


def side_by_side(results: list[Results], error: bool = False) -> SideBySide:
    entries, notes = _entries(results)
    keys = _keys(entries)
    rows = [_aggregate(entries, [k], stream=k[0], corruption=k[1], severity=str(k[2]), kind="cell")
            for k in keys]
    corrupted = [k for k in keys if k[1] != CLEAN]
    severities = sorted({k[2] for k in corrupted})
    if len(severities) > 1:
        for c in sorted({k[1] for k in corrupted}):
            mine = [k for k in corrupted if k[1] == c]
            if len({k[2] for k in mine}) > 1:
                rows.append(_aggregate(entries, mine, stream=None, corruption=c, severity="all",
                                       kind="corruption"))
        rows += [_aggregate(entries, [k for k in corrupted if k[2] == sev], stream=None,
                            corruption="mean", severity=str(sev), kind="severity")
                 for sev in severities]
    overall = corrupted or keys
    label = "mean (corrupted)" if corrupted and len(corrupted) < len(keys) else "mean"
    rows.append(_aggregate(entries, overall, stream=None, corruption=label, severity="", kind="mean"))
    for e in entries:
        have = sum(k in e.values for k in overall)
        if 0 < have < len(overall):
            notes.append(f"{e.label}: its means cover {have} of {len(overall)} cells (partial run "
                         "or other corruptions): compare them with care")
    return SideBySide(entries, rows, error, notes)


def stream_table(table: SideBySide) -> SideBySide | None:
    """One row per stream (mean over its corrupted cells), or None without streams."""
    keys = _keys(table.entries)
    streams = sorted({k[0] for k in keys if k[0] is not None})
    if not streams:
        return None
    rows = [_aggregate(table.entries, [k for k in keys if k[0] == st and k[1] != CLEAN]
                       or [k for k in keys if k[0] == st], stream=st, corruption="mean",
                       severity="", kind="stream") for st in streams]
    return SideBySide(table.entries, rows, table.error, [])
