"""Geometric warps about the image centre (MNIST-C's shear, scale, rotate, translate).

Bilinear resampling, black outside the image, like scikit-image's `warp` in MNIST-C.
"""

from __future__ import annotations

import numpy as np

from pipeline.corruptions.core import draw, register
from pipeline.corruptions.ops import affine_warp

__all__ = ["shear", "scale", "rotate", "translate"]


def _signs(rngs, k: int = 1) -> np.ndarray:
    """k random ±1 per sample: (N, k)."""
    return draw(rngs, lambda g: g.integers(0, 2, size=k) * 2 - 1).astype(np.float64)


@register("shear", "horizontal shear by ±angle_rad (random sign), centre fixed")
def shear(x, rngs, *, norm_std, angle_rad):
    a = angle_rad * _signs(rngs)[:, 0]
    m = np.zeros((len(x), 2, 2))
    # scikit-image's AffineTransform(shear=a): [[1, -sin a], [0, cos a]] on (col, row)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 1] = 1.0, -np.sin(a), np.cos(a)
    return affine_warp(x, m)


@register("scale", "shrink the digit by `factor` about the centre", random=False)
def scale(x, rngs, *, norm_std, factor):
    m = np.zeros((len(x), 2, 2))
    m[:, 0, 0] = m[:, 1, 1] = 1.0 / factor  # sample a larger window: the digit shrinks
    return affine_warp(x, m)


@register("rotate", "rotate by ±angle_rad (random sign) about the centre")
def rotate(x, rngs, *, norm_std, angle_rad):
    a = angle_rad * _signs(rngs)[:, 0]
    cos, sin = np.cos(a), np.sin(a)
    m = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], 1)  # (N, 2, 2)
    return affine_warp(x, m)


@register("translate", "shift by ±pixels in both x and y (random signs)")
def translate(x, rngs, *, norm_std, pixels):
    m = np.broadcast_to(np.eye(2), (len(x), 2, 2))
    return affine_warp(x, m, shift=pixels * _signs(rngs, 2))
