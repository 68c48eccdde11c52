"""Report figures as PNG bytes (matplotlib, Agg backend: headless, no display needed)."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")  # headless; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from pipeline.report.table import CLEAN, Series  # noqa: E402

__all__ = ["batch_accuracy", "accuracy_vs_steps", "batch_boxplots", "gain_bars", "to_png",
           "series_colors"]

_STYLES = ["-", "--", ":", "-."]
_MARKERS = ["o", "s", "^", "D", "v", "P"]


def series_colors(n: int) -> list:
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def batch_accuracy(pred: pa.Table, method: str) -> pa.Table:
    """Accuracy of every adaptation batch: (shard, corruption, severity, batch, step) -> accuracy."""
    keys = ["shard", "corruption", "severity", "batch", "step"]
    rows = pred.filter(pc.equal(pred.column("method"), method)).select(keys + ["correct"])
    rows = rows.set_column(len(keys), "correct", pc.cast(rows.column("correct"), pa.float64()))
    out = rows.group_by(keys).aggregate([("correct", "mean")])
    return out.rename_columns(keys + ["accuracy"])


def _corruptions(series: list[Series]) -> list[str]:
    names = {c for s in series for (c, _, _) in s.accuracy}
    return sorted(names, key=lambda c: (c != CLEAN, c))


def accuracy_vs_steps(series: list[Series]) -> bytes:
    """Small multiples, one panel per corruption: accuracy (%) against adaptation step, one
    line per severity (colour) and series (line style)."""
    corruptions = _corruptions(series)
    severities = sorted({sev for s in series for (c, sev, _) in s.accuracy if c != CLEAN})
    cmap = plt.get_cmap("plasma")
    sev_color = {sev: cmap(0.1 + 0.75 * i / max(1, len(severities) - 1))
                 for i, sev in enumerate(severities)}
    ncols = min(4, len(corruptions))
    nrows = math.ceil(len(corruptions) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows + 0.6),
                             squeeze=False, sharex=True, sharey=True)
    max_step = max((s.last_step for s in series), default=0)
    for ax, corruption in zip(axes.flat, corruptions):
        for j, s in enumerate(series):
            sevs = sorted({sev for (c, sev, _) in s.accuracy if c == corruption})
            for sev in sevs:
                steps = [k for k in s.steps if (corruption, sev, k) in s.accuracy]
                acc = [100 * s.accuracy[(corruption, sev, k)] for k in steps]
                color = "black" if corruption == CLEAN else sev_color[sev]
                ax.plot(steps, acc, _STYLES[j % len(_STYLES)], marker=_MARKERS[j % len(_MARKERS)],
                        color=color, markersize=4, linewidth=1.6)
        ax.set_title("clean (identity)" if corruption == CLEAN else corruption, fontsize=11)
        ax.grid(True, linestyle="--", alpha=0.5)
        ax.set_xticks(range(0, max_step + 1, max(1, math.ceil((max_step + 1) / 8))))
    for ax in axes.flat[len(corruptions):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (%)")
    for ax in axes[-1, :]:
        ax.set_xlabel("adaptation step")
    handles = [Line2D([], [], color=sev_color[sev], linewidth=2, label=f"severity {sev}")
               for sev in severities]
    if len(series) > 1 or not handles:
        handles += [Line2D([], [], color="grey", linestyle=_STYLES[j % len(_STYLES)],
                           marker=_MARKERS[j % len(_MARKERS)], label=s.label)
                    for j, s in enumerate(series)]
    fig.suptitle("Accuracy vs adaptation steps" + (f" ({series[0].label})" if len(series) == 1 else ""),
                 fontsize=14, fontweight="bold")
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(len(handles), 6), frameon=False)
    fig.tight_layout()
    return to_png(fig)


def batch_boxplots(series: list[Series]) -> bytes:
    """Per-batch accuracy, not adapted (step 0) vs adapted (last step), as in the IT3 seed:
    one panel per series, one pair of boxes per corruption (all severities) after 'all'."""
    colors = series_colors(len(series))
    corruptions = _corruptions(series)
    groups = ["all corrupted"] + corruptions if any(c != CLEAN for c in corruptions) else corruptions
    width = min(16.0, max(8.0, 0.8 * len(groups) + 3.0))
    fig, axes = plt.subplots(len(series), 1, figsize=(width, 4.6 * len(series)), squeeze=False)
    for ax, s, color in zip(axes[:, 0], series, colors):
        per_batch = batch_accuracy(s.results.predictions, s.method)
        corr = np.asarray(per_batch.column("corruption").to_pylist(), dtype=object)
        step = per_batch.column("step").to_numpy()
        acc = 100 * per_batch.column("accuracy").to_numpy()
        first, last = (s.steps[0], s.last_step) if s.steps else (0, 0)
        adapted = last != first
        data, positions, colours = [], [], []
        for g, group in enumerate(groups):
            in_group = (corr != CLEAN) if group == "all corrupted" else (corr == group)
            pairs = [(first, "lightgrey")] + ([(last, color)] if adapted else [])
            for p, (k, c) in enumerate(pairs):
                data.append(acc[in_group & (step == k)])
                positions.append(g * 3 + p * 1.1 if adapted else g * 3 + 0.55)
                colours.append(c)
        box = ax.boxplot(data, positions=positions, widths=0.9, meanline=True, showmeans=True,
                         patch_artist=True, boxprops=dict(linewidth=1.3),
                         whiskerprops=dict(linewidth=1.1), capprops=dict(linewidth=1.1),
                         medianprops=dict(linewidth=1.5, color="darkorange"),
                         meanprops=dict(linewidth=1.5, color="red", linestyle="--"),
                         flierprops=dict(markersize=3))
        for patch, c in zip(box["boxes"], colours):
            patch.set_facecolor(c)
        ax.set_xticks([g * 3 + 0.55 for g in range(len(groups))])
        ax.set_xticklabels(["clean (identity)" if g == CLEAN else g for g in groups],
                           rotation=30 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center")
        ax.set_ylabel("per-batch accuracy (%)")
        ax.set_title(f"{s.label}: per-batch accuracy, not adapted vs adapted", fontsize=12)
        ax.grid(True, axis="y", linestyle="--", alpha=0.6)
        legend = [plt.Rectangle((0, 0), 1, 1, facecolor="lightgrey", edgecolor="black",
                                label=f"not adapted (step {first})")]
        if adapted:
            legend.append(plt.Rectangle((0, 0), 1, 1, facecolor=color, edgecolor="black",
                                        label=f"adapted (step {last})"))
        legend += [Line2D([], [], color="darkorange", label="median"),
                   Line2D([], [], color="red", linestyle="--", label="mean")]
        ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9,
                  frameon=False)
    fig.tight_layout()
    return to_png(fig)


def gain_bars(series: list[Series]) -> bytes:
    """Mean gain (last step over step 0, percentage points, averaged over severities) per
    corruption, one bar per series; the last group is the table's mean row."""
    adapted = [s for s in series if len(s.steps) > 1]
    corruptions = _corruptions(adapted)
    groups = corruptions + (["mean (corrupted)"] if any(c != CLEAN for c in corruptions) else [])
    colors = series_colors(len(series))
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.6 * len(groups) * max(1, len(adapted)) + 2)),
                                    4.6))
    width = 0.8 / max(1, len(adapted))
    for j, s in enumerate(adapted):
        first, last = s.steps[0], s.last_step
        row_gain = {(c, sev): s.accuracy[(c, sev, last)] - s.accuracy[(c, sev, first)]
                    for (c, sev, k) in s.accuracy
                    if k == first and (c, sev, last) in s.accuracy}
        gains = {c: 100 * float(np.mean([g for (cc, _), g in row_gain.items() if cc == c]))
                 if any(cc == c for cc, _ in row_gain) else np.nan for c in corruptions}
        corrupted = [g for (c, _), g in row_gain.items() if c != CLEAN]
        # the table's mean row: mean over corrupted (corruption, severity) rows
        gains["mean (corrupted)"] = 100 * float(np.mean(corrupted)) if corrupted else np.nan
        x = np.arange(len(groups)) + (j - (len(adapted) - 1) / 2) * width
        y = [gains.get(g, np.nan) for g in groups]
        bars = ax.bar(x, y, width=width * 0.95, color=colors[series.index(s)],
                      label=f"{s.label} (step {last} vs {first})", edgecolor="black", linewidth=0.6)
        ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:+.1f}" for v in y], fontsize=8,
                     padding=2)
    ax.axhline(0, color="black", linewidth=0.9)
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels(["clean (identity)" if g == CLEAN else g for g in groups],
                       rotation=30 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center")
    ax.set_ylabel("accuracy gain (percentage points)")
    ax.set_title("Mean gain from adaptation per corruption (last step vs step 0)", fontsize=12)
    ax.grid(True, axis="y", linestyle="--", alpha=0.6)
    ax.margins(y=0.15)
    if adapted:
        ax.legend(fontsize=9, loc="best")
    else:
        ax.text(0.5, 0.5, "no adaptation steps in these results (step 0 only)",
                transform=ax.transAxes, ha="center", va="center")
    fig.tight_layout()
    return to_png(fig)
