"""The severity table as Markdown, for docs/corruptions.md (generated, never hand-edited)."""

from __future__ import annotations

from pipeline.corruptions.core import CORRUPTIONS, SEVERITIES, list_corruptions

__all__ = ["markdown_table", "BEGIN", "END"]

BEGIN = "<!-- BEGIN GENERATED: python -m pipeline.corruptions --markdown -->"
END = "<!-- END GENERATED -->"


def _fmt(value: float) -> str:
    return f"{value:g}"


def markdown_table() -> str:
    """One table: a row per (corruption, parameter), values at severities 1..5."""
    head = ["corruption", "parameter", *map(str, SEVERITIES), "output", "MNIST-C setting", "what it does"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in list_corruptions(include_identity=True, include_validation=True):
        c = CORRUPTIONS[name]
        rows = list(c.table.items()) or [("-", ("-",) * len(SEVERITIES))]
        for i, (param, values) in enumerate(rows):
            label = f"`{name}`" + (" (validation)" if c.validation else "")
            cells = [label, f"`{param}`" if param != "-" else param,
                     *(_fmt(v) if param != "-" else v for v in values)]
            cells += [c.output_range, c.mnist_c, c.summary] if i == 0 else ["", "", ""]
            if i > 0:
                cells[0] = ""
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([BEGIN, *lines, END])
