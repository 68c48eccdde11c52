"""When a change in accuracy is a loss, a gain, or noise (the report's colours, the adapt
table's red rows). Kept apart from pipeline.report so the CLI can use it without matplotlib."""

from __future__ import annotations

__all__ = ["GAIN_NOISE", "gain_class"]

# Gains within +-1 point are noise at our sample sizes: the binomial standard error of an
# accuracy p on n samples is sqrt(p(1-p)/n), 1.1 points at p = 0.5 and n = 2000 (the
# demo's samples per corruption, README "Quick start"). Beyond it: a loss (red) or a gain.
GAIN_NOISE = 1.0


def gain_class(points: float | None) -> str | None:
    """"loss" below -GAIN_NOISE points, "gain" above +GAIN_NOISE, else "neutral" (-1.0
    exactly is neutral; rounded to 1e-9 first so float noise in 0.5 - 0.51 cannot flip it)."""
    if points is None:
        return None
    p = round(points, 9)
    return "loss" if p < -GAIN_NOISE else "gain" if p > GAIN_NOISE else "neutral"
