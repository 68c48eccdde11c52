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

__all__ = ["batch_accuracy", "accuracy_vs_steps", "batch_boxplots", "gain_heatmap", "to_png",
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
    """The per-step curve (every step, for insight; the tables show each method's configured
    last step, never the best one): one panel per corruption, accuracy (%) against
    adaptation step, one line per severity (colour) and series (line style)."""
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
    fig.suptitle("Per-step curve: accuracy vs adaptation steps" + (f" ({series[0].label})" if len(series) == 1 else ""),
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


def gain_heatmap(table) -> bytes | None:
    """Gain over the baseline (percentage points) per (corruption, severity), one panel per
    compared series of a `compare.SideBySide`, with each corruption's mean over its severities
    (last column) and each severity's mean over corruptions (last row). Three colours only,
    by `compare.gain_class`: red a loss beyond GAIN_NOISE points, grey within it (noise),
    green a gain beyond it. None when no series is compared with a baseline."""
    from matplotlib.colors import ListedColormap

    from pipeline.report.compare import GAIN_NOISE, gain_class

    entries = [e for e in table.entries if e.baseline.compared]
    if not entries:
        return None
    keys = sorted({k for e in entries for k in e.values}, key=lambda k: (k[1] != CLEAN, k[1], k[2]))
    corruptions = list(dict.fromkeys(k[1] for k in keys))
    severities = sorted({k[2] for k in keys})
    rows, cols = corruptions + ["mean"], [str(v) for v in severities] + ["mean"]
    cmap = ListedColormap(["#d73027", "#e6e6e6", "#1a9850"])  # loss, neutral, gain
    index = {"loss": 0, "neutral": 1, "gain": 2}
    fig, axes = plt.subplots(1, len(entries), squeeze=False,
                             figsize=(1.0 * len(cols) * len(entries) + 2.5 * len(entries),
                                      0.42 * len(rows) + 1.6))
    for ax, e in zip(axes[0], entries):
        grid = np.full((len(rows), len(cols)), np.nan)
        for i, c in enumerate(rows):
            for j, sev in enumerate(severities + [None]):
                mine = [k for k in keys if (c == "mean" and k[1] != CLEAN or k[1] == c)
                        and (sev is None or k[2] == sev)]
                gains = [g for g in (e.gain(k) for k in mine) if g is not None]
                if gains:
                    grid[i, j] = 100 * float(np.mean(gains))
        classes = np.array([[np.nan if np.isnan(v) else index[gain_class(float(v))] for v in line]
                            for line in grid], dtype=float)
        ax.imshow(np.ma.masked_invalid(classes), cmap=cmap, vmin=-0.5, vmax=2.5, aspect="auto")
        for i in range(len(rows)):
            for j in range(len(cols)):
                if not np.isnan(grid[i, j]):
                    loss = classes[i, j] == 0
                    ax.text(j, i, f"{grid[i, j]:+.1f}", ha="center", va="center", fontsize=8,
                            color="white" if loss else "black", fontweight="bold" if loss else None)
        ax.set_xticks(range(len(cols)), cols)
        ax.set_yticks(range(len(rows)), ["clean (identity)" if r == CLEAN else r for r in rows])
        ax.axhline(len(rows) - 1.5, color="black", linewidth=1)
        ax.axvline(len(cols) - 1.5, color="black", linewidth=1)
        ax.set_xlabel("severity")
        ax.set_title(f"{e.label} (step {e.step}), gain {e.baseline.why.split(' (')[0]}", fontsize=10)
    fig.suptitle(f"Accuracy gain (points) over the unadapted model: red < -{GAIN_NOISE:g}, "
                 f"grey within ±{GAIN_NOISE:g} (noise), green > +{GAIN_NOISE:g}", fontsize=11)
    fig.tight_layout()
    return to_png(fig)
