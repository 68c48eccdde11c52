"""The RGB suite's constants as Markdown, for docs/corruptions.md (generated, never hand-edited).

    python -m pipeline.corruptions --markdown-rgb
"""

from __future__ import annotations

from pipeline.corruptions.imagenet_c.core import ALL, VALIDATION
from pipeline.corruptions.imagenet_c.registry import RGB_CORRUPTIONS

__all__ = ["rgb_markdown_table", "BEGIN_RGB", "END_RGB"]

BEGIN_RGB = "<!-- BEGIN GENERATED: python -m pipeline.corruptions --markdown-rgb -->"
END_RGB = "<!-- END GENERATED RGB -->"


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _cell(params: dict) -> str:
    return ", ".join(f"{k} {_fmt(v)}" for k, v in params.items())


def rgb_markdown_table() -> str:
    """Per corruption: what it does, then its constants at severities 1..5 in both tables."""
    head = ["corruption", "table", "1", "2", "3", "4", "5"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in ALL:
        entry = RGB_CORRUPTIONS.get(name)
        if entry is None:
            lines.append(f"| `{name}` | not in this build | | | | | |")
            continue
        label = f"`{name}`" + (" (validation)" if name in VALIDATION else "")
        lines.append(f"| {label} | {entry.summary} | | | | | |")
        for table in ("cifar", "imagenet"):
            cells = [_cell(p) for p in getattr(entry, table)]
            lines.append("| | " + table + " | " + " | ".join(cells) + " |")
    return "\n".join([BEGIN_RGB, *lines, END_RGB])
