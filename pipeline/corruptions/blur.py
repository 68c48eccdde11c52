"""Blurs: glass (blur, local pixel swaps, blur) and motion (one-sided line kernel)."""

from __future__ import annotations

import numpy as np

from pipeline.corruptions.core import draw, register
from pipeline.corruptions.ops import blur, gather

__all__ = ["glass_blur", "motion_blur"]


@register("glass_blur", "blur, swap pixels with random neighbours, blur again (MNIST-C)")
def glass_blur(x, rngs, *, norm_std, sigma, max_delta, iterations):
    """MNIST-C's glass blur: the same raster-order swap loop, run for all samples at once.

    Position (h, w), visited from the bottom-right, is swapped with (h + dy, w + dx),
    dx, dy uniform in [-max_delta, max_delta), with probability 1/2.
    """
    d, n, size = int(max_delta), len(x), x.shape[1]
    x = blur(x, sigma)
    span = list(range(size - d, d, -1))
    k = len(span)
    swap = draw(rngs, lambda g: g.random((int(iterations), k, k)) < 0.5)  # (N, it, k, k)
    delta = draw(rngs, lambda g: g.integers(-d, d, size=(int(iterations), k, k, 2)))
    for it in range(int(iterations)):
        for i, h in enumerate(span):
            for j, w in enumerate(span):
                who = np.flatnonzero(swap[:, it, i, j])
                if who.size == 0:
                    continue
                h2 = h + delta[who, it, i, j, 1]
                w2 = w + delta[who, it, i, j, 0]
                here, there = x[who, h, w], x[who, h2, w2]
                x[who, h, w] = there
                x[who, h2, w2] = here
    return blur(x, sigma)


@register("motion_blur", "one-sided Gaussian line kernel at a random angle in [-45°, 45°]")
def motion_blur(x, rngs, *, norm_std, sigma, length):
    """ImageMagick's `-motion-blur` as MNIST-C uses it, on integer taps 0..length.

    Tap i reads the pixel round(i·cosθ) columns and round(i·sinθ) rows away, with weight
    ∝ exp(-i²/2σ²); pixels outside the image count as black.
    """
    n, size = len(x), x.shape[1]
    length = int(length)
    theta = np.radians(draw(rngs, lambda g: g.uniform(-45.0, 45.0)))  # (N,)
    taps = np.arange(length + 1)
    weights = np.exp(-(taps ** 2) / (2.0 * sigma ** 2))
    weights = (weights / weights.sum()).astype(np.float32)
    padded = np.pad(x, ((0, 0), (length, length), (length, length)))
    grid = np.arange(size) + length
    out = np.zeros_like(x)
    for i, wgt in zip(taps, weights):
        dc = np.ceil(i * np.cos(theta) - 0.5).astype(np.int64)  # ImageMagick's rounding
        dr = np.ceil(i * np.sin(theta) - 0.5).astype(np.int64)
        rows = np.broadcast_to((grid[None, :] + dr[:, None])[:, :, None], x.shape)
        cols = np.broadcast_to((grid[None, :] + dc[:, None])[:, None, :], x.shape)
        out += wgt * gather(padded, rows, cols)
    return out
