"""`Normalize`: the first module of every zoo model, (x - mean) / std with fixed buffers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from pipeline.errors import TTTPipeError

__all__ = ["Normalize", "as_stats"]

Stat = float | Sequence[float]


def as_stats(value: Stat, what: str) -> tuple[float, ...]:
    """A scalar or per-channel sequence as a tuple of finite floats (one-line error otherwise)."""
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    values = (value,) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise TTTPipeError(f"normalisation {what} must be a number or a list of numbers, "
                           f"got {value!r}") from None
    if not out or not all(math.isfinite(v) for v in out):
        raise TTTPipeError(f"normalisation {what} must be finite numbers, got {value!r}")
    return out


class Normalize(nn.Module):
    """(x - mean) / std; buffers (not weights: the manifest carries them) that follow `.to()`.

    One value (a float or a length-1 sequence) -> 0-dim buffers, exactly the seeds' scalar
    normalisation; C values -> (1, C, 1, 1) buffers, one per channel. The mean and std must
    have the same number of values (or one of them a single value).
    """

    def __init__(self, mean: Stat, std: Stat):
        super().__init__()
        mean_t, std_t = as_stats(mean, "mean"), as_stats(std, "std")
        if not all(s > 0 for s in std_t):
            raise TTTPipeError(f"normalisation std must be > 0, got {std!r}")
        n = max(len(mean_t), len(std_t))
        if {len(mean_t), len(std_t)} - {1, n}:
            raise TTTPipeError(f"normalisation mean has {len(mean_t)} values and std {len(std_t)}; "
                               "give one per channel (or one for all)")
        if n == 1:
            m, s = torch.tensor(mean_t[0]), torch.tensor(std_t[0])
        else:
            m = torch.tensor(mean_t * (n // len(mean_t))).view(1, n, 1, 1)
            s = torch.tensor(std_t * (n // len(std_t))).view(1, n, 1, 1)
        self.register_buffer("mean", m, persistent=False)
        self.register_buffer("std", s, persistent=False)

    @property
    def channels(self) -> int | None:
        """Channels the per-channel statistics expect (None: one value for all)."""
        return None if self.mean.dim() == 0 else self.mean.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        fmt = lambda t: ", ".join(f"{v:.4f}" for v in t.flatten().tolist())  # noqa: E731
        return f"mean=({fmt(self.mean)}), std=({fmt(self.std)})"


def check_channels(norm: Normalize, in_channels: int, model: str) -> None:
    if norm.channels is not None and norm.channels != in_channels:
        raise TTTPipeError(f"{model}: normalisation has {norm.channels} values per statistic but "
                           f"the model takes {in_channels} channel(s); give one per channel")
