"""Noise: gaussian, shot (Poisson), impulse (salt & pepper) and speckle, element-wise per channel.

Each sample draws from a torch generator seeded by its own numpy generator. Shot noise draws
Poisson counts by inverting the CDF: the input is uint8 / 255, so only 256 rates x * c exist and
their CDFs are tabulated once (exact Poisson up to float64 rounding of the CDF).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from scipy import stats

from pipeline.corruptions.imagenet_c.filters import per_sample, torch_generators
from pipeline.corruptions.imagenet_c.registry import register

__all__ = ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "poisson_table"]


def _randn(x: torch.Tensor, rngs) -> torch.Tensor:
    return per_sample(torch_generators(rngs), lambda g: torch.randn(x.shape[1:], generator=g))


def _rand(x: torch.Tensor, rngs, dtype=torch.float32) -> torch.Tensor:
    return per_sample(torch_generators(rngs),
                      lambda g: torch.rand(x.shape[1:], generator=g, dtype=dtype))


@register("gaussian_noise", "x + N(0, c²) per pixel and channel",
          cifar=tuple({"c": c} for c in (0.04, 0.06, 0.08, 0.09, 0.10)),
          imagenet=tuple({"c": c} for c in (0.08, 0.12, 0.18, 0.26, 0.38)))
def gaussian_noise(x, rngs, *, c):
    return x + c * _randn(x, rngs)


@lru_cache(maxsize=64)
def poisson_table(c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The 256 CDFs of Poisson(k / 255 * c), k = 0..255, as one sorted float64 sequence.

    Entry j of level k is k + P(count <= j) (kept below k + 1), so for u in [0, 1)
    searchsorted(seq, k + u, right=True) - start[k] is the count with that CDF value.
    """
    lam = np.arange(256, dtype=np.float64) / 255.0 * c
    top = int(c + 12 * np.sqrt(c) + 20)  # P(count >= top) < 1e-20 for every rate <= c
    cdf = stats.poisson.cdf(np.arange(top)[None, :], lam[:, None])  # (256, top)
    cdf = np.minimum(cdf, np.nextafter(1.0, 0.0))
    seq = (np.arange(256)[:, None] + cdf).ravel()
    return torch.from_numpy(seq), torch.arange(256, dtype=torch.int64) * top


@register("shot_noise", "Poisson(x * c) / c per pixel and channel",
          cifar=tuple({"c": c} for c in (500, 250, 100, 75, 50)),
          imagenet=tuple({"c": c} for c in (60, 25, 12, 5, 3)))
def shot_noise(x, rngs, *, c):
    seq, start = poisson_table(float(c))
    level = torch.round(x * 255.0).to(torch.int64)  # x is uint8 / 255
    u = _rand(x, rngs, torch.float64)
    counts = torch.searchsorted(seq, level.to(torch.float64) + u, right=True) - start[level]
    return counts.to(torch.float32) / float(c)


@register("impulse_noise", "salt & pepper: a fraction c of values set to 0 or 1 (half each)",
          cifar=tuple({"c": c} for c in (0.01, 0.02, 0.03, 0.05, 0.07)),
          imagenet=tuple({"c": c} for c in (0.03, 0.06, 0.09, 0.17, 0.27)))
def impulse_noise(x, rngs, *, c):
    u = _rand(x, rngs)  # one uniform decides both: u < c/2 pepper, c/2 <= u < c salt
    y = torch.where(u < c, (u >= c / 2).to(x.dtype), x)
    return y


@register("speckle_noise", "x + x * N(0, c²) per pixel and channel",
          cifar=tuple({"c": c} for c in (0.06, 0.1, 0.12, 0.16, 0.2)),
          imagenet=tuple({"c": c} for c in (0.15, 0.2, 0.35, 0.45, 0.6)))
def speckle_noise(x, rngs, *, c):
    return x + x * (c * _randn(x, rngs))
