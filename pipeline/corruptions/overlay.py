"""Intensity changes and overlays: identity, brightness, stripe, fog, spatter, dotted_line,
zigzag, canny_edges."""

from __future__ import annotations

import numpy as np

from pipeline.corruptions.core import draw, register
from pipeline.corruptions.ops import blur, canny, line_band, plasma_fractal, polyline_band

__all__ = ["identity", "brightness", "stripe", "fog", "spatter", "dotted_line", "zigzag",
           "canny_edges"]

_MUD = 63 / 255.0  # MNIST-C's spatter colour


@register("identity", "the clean images, unchanged (written once, at severity 0)", clip=False,
          random=False)
def identity(x, rngs, *, norm_std):
    return x


@register("brightness", "x + shift (MNIST-C's HSV value shift, exact for grey images)",
          random=False)
def brightness(x, rngs, *, norm_std, shift):
    return x + shift


@register("stripe", "invert the `width` leftmost and rightmost columns", random=False)
def stripe(x, rngs, *, norm_std, width):
    w = int(width)
    out = x.copy()
    out[:, :, :w] = 1.0 - x[:, :, :w]
    out[:, :, x.shape[2] - w:] = 1.0 - x[:, :, x.shape[2] - w:]
    return out


@register("fog", "(x + amount·plasma) · max(x) / (max(x) + amount), plasma from diamond-square")
def fog(x, rngs, *, norm_std, amount, decay):
    size = 32  # smallest power of two covering 28 (MNIST-C: 256, then crops 28x28)
    u = draw(rngs, lambda g: g.uniform(-1.0, 1.0, size=size * size))
    plasma = plasma_fractal(u, size, decay)[:, :x.shape[1], :x.shape[2]]
    top = x.max(axis=(1, 2), keepdims=True)
    return (x + amount * plasma) * top / (top + amount)


@register("spatter", "blurred, thresholded noise blobs painted in mud grey (MNIST-C)")
def spatter(x, rngs, *, norm_std, loc, scale, sigma, threshold, mask_sigma):
    liquid = draw(rngs, lambda g: g.normal(loc, scale, size=x.shape[1:]))
    liquid = blur(liquid, sigma)
    mask = blur((liquid > threshold).astype(np.float64), mask_sigma)
    mask[mask < 0.8] = 0.0
    return x * (1.0 - mask) + _MUD * mask


@register("dotted_line", "`lines` random full-width dashed lines (dash_on px on, dash_off off)")
def dotted_line(x, rngs, *, norm_std, lines, dash_on, dash_off):
    n, size = len(x), x.shape[2]
    rows = draw(rngs, lambda g: g.integers(0, size - 1, size=(int(lines), 2)))  # (N, L, 2)
    period = int(dash_on + dash_off)
    dashes = (np.arange(size) % period) >= dash_off  # MNIST-C: columns 0-1 off, 2-3 on, ...
    total = np.zeros_like(x, dtype=np.float64)
    for k in range(int(lines)):
        band = line_band(np.zeros(n), rows[:, k, 0], np.full(n, size - 1.0), rows[:, k, 1], size)
        total += band * dashes
    return x + total


def _zigzag_vertices(c0, r0, c1, r1, a: float = 2.0, b: float = 2.0):
    """Vertices of MNIST-C's zigzag along (c0, r0) -> (c1, r1): cols, rows, each (N, P).

    A triangle wave of half-period 2a and amplitude b (vertices at 0, a, 3a, 5a, ...),
    stopped at the segment's end (MNIST-C's last vertex is a rough version of that stop).
    """
    theta = np.arctan((r1 - r0) / (c1 - c0))
    d = ((c1 - c0) / np.cos(theta))[:, None]  # (N, 1) length of the segment
    count = int(np.ceil((d.max() - a) / (2 * a))) + 1
    t = np.minimum(np.concatenate([[0.0], (2 * np.arange(count) + 1) * a])[None, :], d)  # (N, P)
    phase = np.mod(t - a, 4 * a)
    s = b * (np.abs(phase - 2 * a) / a - 1.0)  # +b at a, -b at 3a, ...
    cos, sin = np.cos(theta)[:, None], np.sin(theta)[:, None]
    return cos * t - sin * s + c0[:, None], sin * t + cos * s + r0[:, None]


@register("zigzag", "`zigzags` random zigzag lines, each over `span` columns (MNIST-C)")
def zigzag(x, rngs, *, norm_std, zigzags, span):
    n, size, k = len(x), x.shape[2], int(zigzags)
    # per zigzag: start row in [0, 27), row change in [-5, 5), start column in [2, 25 - span]
    u = draw(rngs, lambda g: np.stack([g.integers(0, size - 1, size=k), g.integers(-5, 5, size=k),
                                       g.integers(0, 24 - int(span), size=k)], 1))  # (N, k, 3)
    u = u.astype(np.float64)
    total = np.zeros_like(x, dtype=np.float64)
    for j in range(k):
        c0, r0 = 2.0 + u[:, j, 2], u[:, j, 0]
        total += polyline_band(*_zigzag_vertices(c0, r0, c0 + span, r0 + u[:, j, 1]), size)
    return x + total


@register("canny_edges", "Canny edge map (sigma) blended over the image with weight `blend`",
          random=False)
def canny_edges(x, rngs, *, norm_std, sigma, blend):
    return (1.0 - blend) * x + blend * canny(x, sigma)
