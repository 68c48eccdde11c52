"""Noise: gaussian, shot (Poisson), impulse (salt & pepper) and speckle, element-wise per channel.

Each sample draws from a torch generator seeded by its own numpy generator. Shot noise draws
Poisson counts by inverting the CDF: the input is uint8 / 255, so only 256 rates x * c exist and
their CDFs are tabulated once, with a guide table (exact Poisson up to float64 rounding).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from scipy import stats

from pipeline.corruptions.imagenet_c.filters import torch_generators
from pipeline.corruptions.imagenet_c.registry import per_pixel, register

__all__ = ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "poisson_table", "poisson_counts"]


def _randn(x: torch.Tensor, rngs) -> torch.Tensor:
    out = torch.empty(x.shape)
    for i, g in enumerate(torch_generators(rngs)):
        torch.randn(x.shape[1:], generator=g, out=out[i])
    return out


def _rand(x: torch.Tensor, rngs, dtype=np.float32) -> np.ndarray:
    """Uniforms in [0, 1) shaped like x, straight from each sample's numpy generator (PCG64
    draws uniforms faster than torch's CPU generator; torch's is faster for normals)."""
    out = np.empty(x.shape, dtype=dtype)
    for i, r in enumerate(rngs):
        r.random(x.shape[1:], dtype=dtype, out=out[i])
    return out


@register("gaussian_noise", "x + N(0, c²) per pixel and channel",
          cifar=tuple({"c": c} for c in (0.04, 0.06, 0.08, 0.09, 0.10)),
          imagenet=tuple({"c": c} for c in (0.08, 0.12, 0.18, 0.26, 0.38)))
@per_pixel
def gaussian_noise(x, rngs, *, c):
    return _randn(x, rngs).mul_(c).add_(x)


_GUIDE = 1024  # guide-table buckets per rate


@lru_cache(maxsize=64)
def poisson_table(c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """CDFs of Poisson(k / 255 * c), k = 0..255, and a guide table for inverting them.

    cdf (256, top) float64; guide (256, _GUIDE) int64: guide[k, b] is the smallest count j
    with cdf[k, j] > b / _GUIDE, so the count for a uniform u in bucket b is found by walking
    up from guide[k, b] while cdf[k, j] <= u (Chen & Asau's guided inversion; exact).
    """
    lam = np.arange(256, dtype=np.float64) / 255.0 * c
    top = int(c + 12 * np.sqrt(c) + 20)  # P(count >= top) < 1e-20 for every rate <= c
    cdf = stats.poisson.cdf(np.arange(top)[None, :], lam[:, None])  # (256, top)
    cdf[:, -1] = 1.0
    edges = np.arange(_GUIDE) / _GUIDE
    guide = np.stack([np.searchsorted(row, edges, side="right") for row in cdf])
    return torch.from_numpy(cdf), torch.from_numpy(guide.astype(np.int32))


_COUNT_STEP = 1 << 15  # values per step of poisson_counts (its temporaries stay in cache)


def poisson_counts(level: np.ndarray, u: np.ndarray, c: float) -> np.ndarray:
    """Poisson(level / 255 * c) counts by inversion of u (float64 uniforms in [0, 1)).

    numpy fancy indexing (several times faster than torch's advanced indexing on CPU), in
    steps of _COUNT_STEP values (more for high rates); int32 counts shaped like `level`."""
    cdf, guide = poisson_table(float(c))
    top = cdf.shape[1]
    flat_cdf, flat_guide = cdf.numpy().reshape(-1), guide.numpy().reshape(-1)
    levels, uniforms = level.reshape(-1), u.reshape(-1)
    out = np.empty(levels.shape, dtype=np.int32)
    step = _COUNT_STEP * max(1, top // 100)  # high rates walk longer: fewer, larger steps
    for start in range(0, levels.size, step):
        lv, v = levels[start:start + step], uniforms[start:start + step]
        row = lv * top
        bucket = (v * _GUIDE).astype(np.int32)  # exact: _GUIDE is a power of two
        bucket += lv * _GUIDE
        j = flat_guide[bucket]  # the first candidate count for u's bucket in level's row
        active = np.flatnonzero(flat_cdf[row + j] <= v)  # the few that must walk further
        while active.size:
            j[active] += 1
            still = flat_cdf[row[active] + j[active]] <= v[active]
            active = active[still]
        out[start:start + step] = j
    return out.reshape(level.shape)


@register("shot_noise", "Poisson(x * c) / c per pixel and channel",
          cifar=tuple({"c": c} for c in (500, 250, 100, 75, 50)),
          imagenet=tuple({"c": c} for c in (60, 25, 12, 5, 3)))
def shot_noise(x, rngs, *, c):
    level = np.rint(x.numpy() * 255.0).astype(np.int32)  # x is uint8 / 255
    counts = poisson_counts(level, _rand(x, rngs, np.float64), c)
    return torch.from_numpy(counts.astype(np.float32)).div_(float(c))


@register("impulse_noise", "salt & pepper: a fraction c of values set to 0 or 1 (half each)",
          cifar=tuple({"c": c} for c in (0.01, 0.02, 0.03, 0.05, 0.07)),
          imagenet=tuple({"c": c} for c in (0.03, 0.06, 0.09, 0.17, 0.27)))
@per_pixel
def impulse_noise(x, rngs, *, c):
    u = torch.from_numpy(_rand(x, rngs))  # one uniform decides both: u < c/2 pepper, c/2 <= u < c salt
    y = torch.where(u < c, (u >= c / 2).to(x.dtype), x)
    return y


@register("speckle_noise", "x + x * N(0, c²) per pixel and channel",
          cifar=tuple({"c": c} for c in (0.06, 0.1, 0.12, 0.16, 0.2)),
          imagenet=tuple({"c": c} for c in (0.15, 0.2, 0.35, 0.45, 0.6)))
@per_pixel
def speckle_noise(x, rngs, *, c):
    return _randn(x, rngs).mul_(c).add_(1.0).mul_(x)
