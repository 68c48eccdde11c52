"""index.html: the table and every plot in one self-contained page (base64 images, inline CSS)."""

from __future__ import annotations

import base64
import html
from datetime import datetime, timezone

from pipeline.results import Results

__all__ = ["render_html"]

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
tr.mean td{font-weight:bold;border-top:2px solid #888}
td.up{color:#137333}td.down{color:#b3261e}
td.loss{background:#d73027;color:#fff;font-weight:bold}td.gain{background:#d9f0d3;color:#137333}
.warn{background:#fff4e5;border-left:4px solid #f0a030;padding:.6em 1em;margin:1em 0}
.note{color:#555;font-size:.9em}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}
code{background:#f3f3f3;padding:0 .2em}
"""


def _lookup(run: dict, key: str):
    """`key` at the top of run.json, else inside its `settings` or `args` sections."""
    for section in (run, run.get("settings"), run.get("args")):
        if isinstance(section, dict) and section.get(key) is not None:
            return section[key]
    return ""


def _runs(results: list[Results]) -> str:
    rows = []
    for r in results:
        run = r.run
        ck = run.get("checkpoint")
        if isinstance(ck, dict):  # a path, or the checkpoint manifest itself
            model = ck.get("model")
            ck = ck.get("path") or ck.get("uri") or (model.get("name", "") if isinstance(model, dict) else "")
        asked = len(r.shard_uris) or "?"
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
            r.path, ", ".join(r.methods), _lookup(run, "steps"), ck or "",
            f"{len(r.done_shards)} / {asked}", r.predictions.num_rows)) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("results folder", "method", "steps", "checkpoint",
                                               "shards done", "prediction rows"))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _missing(results: list[Results]) -> str:
    parts = []
    for r in results:
        if r.missing_shards:
            names = ", ".join(f"<code>{html.escape(s)}</code>" for s in r.missing_shards)
            parts.append(f"<div class='warn'><b>Partial results:</b> {html.escape(r.path)} is missing "
                         f"{len(r.missing_shards)} of {len(r.shard_uris)} shards (run still going or "
                         f"interrupted; rerun it to resume): {names}</div>")
    return "\n".join(parts)


def render_html(compare_html: str, steps_html: str, cost_html: str, streams_html: str | None,
                figures: list[tuple[str, str, bytes]], results: list[Results],
                notes: list[str], error: bool = False, lead: int = 0) -> str:
    """The tables (side by side, per stream, cost, per step) and `figures` (title, caption,
    png bytes; the first `lead` go with the comparison, the rest after the per-step table).
    Everything is embedded; no external resources."""
    figs = []
    for title, caption, png in figures:
        data = base64.b64encode(png).decode("ascii")
        figs.append(f"<h2>{html.escape(title)}</h2><figure><img alt='{html.escape(title)}' "
                    f"src='data:image/png;base64,{data}'><figcaption>{html.escape(caption)}"
                    "</figcaption></figure>")
    note_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ttt-pipe report</title>
<style>{_CSS}</style></head>
<body>
<h1>ttt-pipe report</h1>
<p class="note">Generated {stamp}. {'Error' if error else 'Accuracy'} in %, gain in percentage
points over the unadapted model, at each method's configured last step.</p>
{_missing(results)}
<h2>Runs</h2>
{_runs(results)}
<h2>Methods side by side ({'error' if error else 'accuracy'})</h2>
{compare_html}
{('<ul class="note">' + note_html + '</ul>') if notes else ''}
{'' if streams_html is None else '<h2>Per stream</h2>' + streams_html}
<h2>Cost</h2>
{cost_html}
{''.join(figs[:lead])}
<h2>Per-step curve (accuracy at every step)</h2>
<p class="note">For insight only: the comparison above uses each method's configured last step,
never the best step on test labels. Gain here: last step minus step 0 of the same run, which is
the unadapted model only for episodic ttt/it3.</p>
{steps_html}
{''.join(figs[lead:])}
</body></html>
"""
