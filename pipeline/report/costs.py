"""The cost table beside the accuracy: adaptation time per sample and peak memory per actor,
one row per series, from the shards' cost records (`pipeline.cost`). Results folders of older
versions have none: their row says n/a."""

from __future__ import annotations

import html
from dataclasses import dataclass

import pyarrow as pa

from pipeline.cost import read_costs
from pipeline.report.table import Series, console_text, csv_text
from pipeline.results import predictions_uri

__all__ = ["CostRow", "CostTable", "cost_table"]

_MIB = 2 ** 20
_MEMORY = {"cuda_max_allocated": "GPU torch.cuda.max_memory_allocated",
           "cpu_max_rss": "CPU process peak RSS (getrusage ru_maxrss)"}


@dataclass(frozen=True)
class CostRow:
    label: str
    shards: int                 # units with a cost record (a unit: an iid shard or a stream)
    done: int                   # units done (Results.done_units)
    ms_per_sample: float | None  # actor milliseconds in the engine per sample
    actors: int
    devices: str
    memory: str                 # what was measured ("" when nothing was)
    peak_mib: float | None      # the largest peak of any actor
    added_mib: float | None     # the largest (peak - base) of any actor: what adaptation added


def _row(s: Series, costs: pa.Table) -> CostRow:
    rows = [r for r in costs.to_pylist() if r["method"] == s.method]
    done = len(s.results.done_units)
    if not rows:
        return CostRow(s.label, 0, done, None, 0, "", "", None, None)
    samples = sum(r["samples"] for r in rows)
    per_actor: dict[str, tuple[int, int]] = {}
    for r in rows:
        if r["peak_bytes"] is None:
            continue
        peak, added = per_actor.get(r["actor"], (0, 0))
        per_actor[r["actor"]] = (max(peak, r["peak_bytes"]),
                                 max(added, r["peak_bytes"] - (r["base_bytes"] or 0)))
    kinds = sorted({r["memory"] for r in rows if r["memory"]})
    return CostRow(
        label=s.label, shards=len(rows), done=done,
        ms_per_sample=1000 * sum(r["adapt_s"] for r in rows) / samples if samples else None,
        actors=len({r["actor"] for r in rows}), devices=", ".join(sorted({r["device"] for r in rows})),
        memory=" + ".join(_MEMORY.get(k, k) for k in kinds),
        peak_mib=max(p for p, _ in per_actor.values()) / _MIB if per_actor else None,
        added_mib=max(a for _, a in per_actor.values()) / _MIB if per_actor else None)


@dataclass(frozen=True)
class CostTable:
    rows: list[CostRow]

    HEADER = ["method", "units timed", "ms / sample", "actors", "device",
              "peak MiB / actor", "added MiB / actor", "memory measured"]

    def cells(self, r: CostRow, digits: int = 1) -> list[str]:
        na = "n/a"
        return [r.label, f"{r.shards} / {r.done}",
                na if r.ms_per_sample is None else f"{r.ms_per_sample:.{digits + 1}f}",
                str(r.actors) if r.shards else na, r.devices or na,
                na if r.peak_mib is None else f"{r.peak_mib:.{digits}f}",
                na if r.added_mib is None else f"{r.added_mib:.{digits}f}", r.memory or na]

    def caption(self) -> list[str]:
        lines = ["units timed: units of work (an iid shard, or a whole stream) with a cost "
                 "record / done; ms / sample: seconds each actor spent in the engine (adaptation and prediction, "
                 "every step; reading and writing excluded) over the samples; peak: the largest "
                 "of any actor; added: its peak minus its memory before the shard (GPU) or after "
                 "loading the checkpoint (CPU)"]
        old = [r.label for r in self.rows if r.shards == 0]
        if old:
            lines.append(f"n/a: {', '.join(old)} recorded no cost (results of an older ttt-pipe)")
        part = [r.label for r in self.rows if 0 < r.shards < r.done]
        if part:
            lines.append(f"{', '.join(part)}: only some units recorded their cost")
        return lines

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self.HEADER) + " |",
                 "|:---|" + "|".join(["---:"] * 6) + "|:---|"]
        lines += ["| " + " | ".join(self.cells(r)) + " |" for r in self.rows]
        return "\n".join(lines + [""] + [f"- {c}" for c in self.caption()]) + "\n"

    def to_csv(self) -> str:
        rows = (["" if c == "n/a" else c for c in self.cells(r, digits=3)] for r in self.rows)
        return csv_text(self.HEADER, rows)

    def to_html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.HEADER)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in self.cells(r)) + "</tr>"
                       for r in self.rows)
        notes = "".join(f"<li>{html.escape(c)}</li>" for c in self.caption())
        return (f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
                f"<ul class='note'>{notes}</ul>")

    def to_rich(self, title: str | None = "Cost"):
        from rich import box
        from rich.table import Table

        table = Table(title=title, header_style="bold", box=box.SIMPLE_HEAVY, show_edge=False)
        for i, h in enumerate(self.HEADER[:-1]):
            table.add_column(h, justify="left" if i == 0 else "right")
        for r in self.rows:
            table.add_row(*self.cells(r)[:-1])
        return table

    def legend(self) -> list[str]:
        kinds = sorted({r.memory for r in self.rows if r.memory})
        return [f"memory measured: {'; '.join(kinds)}"] * bool(kinds) + self.caption()

    def to_text(self, width: int = 160) -> str:
        return console_text(self.to_rich(), self.legend(), width)


def cost_table(series: list[Series]) -> CostTable:
    """One row per series; each results folder's cost is read once."""
    costs: dict[str, pa.Table] = {}
    for s in series:
        r = s.results
        if r.path not in costs:
            costs[r.path] = read_costs(r.path, [predictions_uri(r.path, n) for n in r.done_units])
    return CostTable([_row(s, costs[s.results.path]) for s in series])
