"""A command option whose value is a JSON object (`--method-config`, `--model-kwargs`).

One parser, so every such option accepts the same forms (nothing, a dict from Python callers,
JSON text) and fails the same way: a one-line `TTTPipeError` naming the option and an example.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.errors import TTTPipeError

__all__ = ["parse_json_object"]


def parse_json_object(value: str | dict | None, option: str, example: str,
                      show_value: bool = False) -> dict[str, Any]:
    """`option`'s JSON text (or a dict) -> a dict; None or "" -> {}.

    Not JSON, or JSON that is not an object: one line naming `option`, with `example` (a JSON
    object) as the fix. `show_value`: that line quotes the text given instead of naming the
    JSON type it parsed to.
    """
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return dict(value)
    try:
        data = json.loads(value)
    except json.JSONDecodeError as exc:
        raise TTTPipeError(f"{option} is not valid JSON ({exc.msg} at char {exc.pos}); "
                           f"write a JSON object, e.g. '{example}'") from None
    if not isinstance(data, dict):
        got = repr(value) if show_value else type(data).__name__
        raise TTTPipeError(f"{option} must be a JSON object, got {got}; e.g. '{example}'")
    return data
