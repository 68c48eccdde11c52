"""Blur: defocus (disk kernel), glass (blur, local pixel shuffle, blur), motion (one random
direction per sample), zoom (average of centre zooms) and gaussian.

Pixel-sized constants (sigmas, radii, shuffle distance) are scaled by `size_scale`, which is
1 at the tables' own sizes (32x32 cifar, 224x224 imagenet).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.corruptions.imagenet_c.core import size_scale
from pipeline.corruptions.imagenet_c.filters import (border_index, filter2d, gaussian_filter,
                                                     is_small, separable_filter)
from pipeline.corruptions.imagenet_c.registry import register

__all__ = ["gaussian_blur", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "disk",
           "shuffle_permutation", "motion_offsets", "motion_blur_at", "clipped_zoom"]


def _scale(x: torch.Tensor) -> float:
    return size_scale(*x.shape[-2:])


@register("gaussian_blur", "Gaussian blur of sigma c (scipy 'nearest' border, truncate 4)",
          cifar=tuple({"sigma": s} for s in (0.4, 0.6, 0.7, 0.8, 1.0)),
          imagenet=tuple({"sigma": s} for s in (1, 2, 3, 4, 6)), random=False)
def gaussian_blur(x, rngs, *, sigma):
    return gaussian_filter(x, sigma * _scale(x))


@lru_cache(maxsize=64)
def disk(radius: float, alias_blur: float) -> np.ndarray:
    """The reference's defocus kernel: a normalised disk on a 17x17 grid (radius <= 8, else
    (2r+1)²), smoothed by a 3x3 (5x5) Gaussian of sigma alias_blur with OpenCV's default
    BORDER_REFLECT_101, as float32."""
    if radius <= 8:
        grid, ksize = np.arange(-8, 9), 3
    else:
        r = math.ceil(radius)
        grid, ksize = np.arange(-r, r + 1), 5
    gx, gy = np.meshgrid(grid, grid)
    aliased = ((gx ** 2 + gy ** 2) <= radius ** 2).astype(np.float32)
    aliased /= aliased.sum()
    t = np.arange(ksize) - (ksize - 1) / 2  # cv2.getGaussianKernel(ksize, sigma)
    g = np.exp(-t * t / (2 * alias_blur ** 2))
    g /= g.sum()
    out = separable_filter(torch.from_numpy(aliased.astype(np.float64)), g, g, "reflect101")
    return out.numpy().astype(np.float32)


@register("defocus_blur", "correlation with an anti-aliased disk of radius r (reflect-101 border)",
          cifar=tuple({"radius": r, "alias_blur": a}
                      for r, a in ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))),
          imagenet=tuple({"radius": r, "alias_blur": a}
                         for r, a in ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))),
          random=False)
def defocus_blur(x, rngs, *, radius, alias_blur):
    s = _scale(x)
    return filter2d(x, disk(radius * s, alias_blur * s).astype(np.float64))


def shuffle_permutation(height: int, width: int, delta: int, offsets: np.ndarray) -> torch.Tensor:
    """Where each pixel comes from after the reference's sequential local "swaps".

    The reference visits h = H-d .. d+1 and, inside, w = W-d .. d+1 (descending), `iterations`
    times, and runs `x[h, w], x[h', w'] = x[h', w'], x[h, w]` with h' = h + dy, w' = w + dx,
    dx, dy in [-d, d). On (H, W, 3) arrays both sides are views, so this is a copy, not a
    swap: x[h, w] = x[h', w'] and (h', w') keeps its value (checked against imagecorruptions'
    numba kernel, and so are ImageNet-C's released files). `offsets` holds the draws,
    (N, iterations, H - 2d, W - 2d, 2) as (dx, dy); step (a, b) (a-th row, b-th column
    visited) is pixel (H-d-a, W-d-b) and reads pixel (h + dy, w + dx), which is step
    (a - dy, b - dx) when that lies in the swept area.

    Within one sweep every pixel is written once, by its own step, so the value a step reads
    is its source's new value if the source's step came earlier in the sweep (dy > 0, or
    dy = 0 and dx > 0, inside the swept area: a "link"), else the sweep's input value. The
    new value of a pixel is then the input value at the source of the first non-link step
    down its chain of links, found for all steps at once by pointer jumping (chains are
    short: a link's probability is below 1/2). Result: (N, H*W) source indices,
    flat_out = flat_in[perm], exactly the sequential result.
    """
    n, iterations, rows, cols, _ = offsets.shape
    size = height * width
    perm = np.tile(np.arange(size, dtype=np.int64), (n, 1)).reshape(n, height, width)
    if rows > 0 and cols > 0:
        d = delta
        a, b = np.arange(rows, dtype=np.int32)[:, None], np.arange(cols, dtype=np.int32)[None, :]
        pix = ((height - d - a) * width + (width - d - b)).reshape(-1).astype(np.int64)  # step -> pixel
        own = np.arange(rows * cols)
        ea, eb = min(d, rows), min(d, cols)
        for k in range(n):  # one sample at a time: its arrays stay in cache
            flat = perm[k].reshape(-1)
            swept = perm[k, height - d:d:-1, width - d:d:-1]  # the steps' pixels, a view
            for it in range(iterations):
                dxy = offsets[k, it].astype(np.int32)
                dx, dy = dxy[..., 0], dxy[..., 1]
                src = pix + (dy * width + dx).reshape(-1)  # the pixel each step reads
                if d > 1:  # with d = 1, dx, dy <= 0: no step reads an earlier step's pixel
                    back = dy * cols + dx  # how many steps earlier the source step ran
                    # earlier: dy > 0, or dy = 0 and dx > 0 (back > 0 says so when cols > d)
                    link = back > 0 if cols > d else np.where(dy == 0, dx > 0, dy > 0)
                    # ... and swept itself, which only steps in the border strips can miss
                    link[:ea] &= dy[:ea] <= a[:ea]
                    link[:, :eb] &= dx[:, :eb] <= b[:, :eb]
                    link[:, cols - eb:] &= dx[:, cols - eb:] > b[:, cols - eb:] - cols
                    link = link.reshape(-1)
                    active = np.flatnonzero(link)
                    jump = own.copy()
                    jump[active] -= back.reshape(-1)[active]
                    active = active[link[jump[active]]]
                    while active.size:  # pointer jumping until every step points at a non-link
                        target = jump[jump[active]]
                        jump[active] = target
                        active = active[link[target]]
                    src = src[jump]
                swept[...] = flat[src].reshape(rows, cols)
    return torch.from_numpy(perm.reshape(n, size))


def _glass_params(x, sigma, max_delta):
    s = _scale(x)
    return sigma * s, max(1, int(round(max_delta * s)))


@register("glass_blur", "blur, quantise to uint8, copy each pixel from a random neighbour (offsets in [-d, d), k sweeps), blur",
          cifar=tuple({"sigma": s, "max_delta": d, "iterations": k}
                      for s, d, k in ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2),
                                      (0.4, 1, 2))),
          imagenet=tuple({"sigma": s, "max_delta": d, "iterations": k}
                         for s, d, k in ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2),
                                         (1.5, 4, 2))))
def glass_blur(x, rngs, *, sigma, max_delta, iterations):
    sigma, d = _glass_params(x, sigma, max_delta)
    n, c, height, width = x.shape
    y = torch.floor(gaussian_filter(x, sigma).clamp(0, 1) * 255.0) / 255.0  # np.uint8(... * 255)
    rows, cols = max(height - 2 * d, 0), max(width - 2 * d, 0)
    offsets = np.stack([r.integers(-d, d, size=(iterations, rows, cols, 2), dtype=np.int8)
                        for r in rngs])
    perm = shuffle_permutation(height, width, d, offsets)  # (N, H*W)
    y = y.reshape(n, c, -1).gather(2, perm[:, None, :].expand(n, c, -1)).reshape(x.shape)
    return gaussian_filter(y, sigma)


def motion_offsets(radius: int, angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """imagecorruptions' kernel steps: (dy, dx) of tap i = 0..2r for a blur along `angle_deg`."""
    width = 2 * radius + 1
    i = np.arange(width)
    dy = -np.ceil(i * np.sin(np.deg2rad(angle_deg)) - 0.5).astype(np.int64)
    dx = -np.ceil(i * np.cos(np.deg2rad(angle_deg)) - 0.5).astype(np.int64)
    return dy, dx


@register("motion_blur", "sum of shifted copies with Gaussian weights along a random angle in "
          "[-45°, 45°] (imagecorruptions' replacement for ImageMagick's -motion-blur)",
          cifar=tuple({"radius": r, "sigma": s}
                      for r, s in ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))),
          imagenet=tuple({"radius": r, "sigma": s}
                         for r, s in ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))))
def motion_blur(x, rngs, *, radius, sigma):
    s = _scale(x)
    radius, sigma = max(1, int(round(radius * s))), sigma * s
    return motion_blur_at(x, [r.uniform(-45, 45) for r in rngs], radius, sigma)


def motion_blur_at(x: torch.Tensor, angles, radius: int, sigma: float) -> torch.Tensor:
    """imagecorruptions' `_motion_blur` over a batch, one angle (degrees) per sample."""
    height, width = x.shape[-2:]
    taps = np.arange(2 * radius + 1)
    weights = np.exp(-taps ** 2 / (2 * sigma ** 2)) / (np.sqrt(2 * np.pi) * sigma)
    weights = weights / weights.sum()
    # replicate-pad each sample once (one at a time: the padded copy stays in cache); a
    # shift by (dy, dx) is then a window of the padded image
    r = 2 * radius + 1
    rows, cols = border_index(height, r, r, "nearest"), border_index(width, r, r, "nearest")
    out = torch.zeros_like(x)
    for k, angle in enumerate(angles):
        xp = x[k].index_select(-2, rows).index_select(-1, cols)
        dy, dx = motion_offsets(radius, angle)
        for i in range(len(taps)):
            if abs(dy[i]) >= height or abs(dx[i]) >= width:  # the reference stops here
                break
            top, left = r - dy[i], r - dx[i]
            out[k].add_(xp[:, top:top + height, left:left + width], alpha=float(weights[i]))
    return out


def clipped_zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Crop the centre ceil(H / z) x ceil(W / z), zoom it by z with scipy.ndimage.zoom(order=1)
    semantics (output round(size * z), corners aligned), trim the centre back to H x W."""
    height, width = x.shape[-2:]
    ch, cw = math.ceil(height / factor), math.ceil(width / factor)
    top, left = (height - ch) // 2, (width - cw) // 2
    crop = x[..., top:top + ch, left:left + cw]
    size = (int(round(ch * factor)), int(round(cw * factor)))
    z = F.interpolate(crop, size=size, mode="bilinear", align_corners=True)
    th, tw = (size[0] - height) // 2, (size[1] - width) // 2
    return z[..., th:th + height, tw:tw + width]


@register("zoom_blur", "mean of the image and its centre zooms by np.arange(1, stop, step)",
          cifar=tuple({"stop": e, "step": 0.01} for e in (1.06, 1.11, 1.16, 1.21, 1.26)),
          imagenet=tuple({"stop": e, "step": st}
                         for e, st in ((1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02),
                                       (1.31, 0.03))),
          random=False)
def zoom_blur(x, rngs, *, stop, step):
    factors = np.arange(1, stop, step)
    if is_small(*x.shape[-2:]):  # small images: NHWC batches resize fastest
        planes = x.contiguous(memory_format=torch.channels_last)
        out = torch.zeros_like(planes)
        for z in factors:
            out += clipped_zoom(planes, float(z))
        return (planes + out) / (len(factors) + 1)
    # larger ones as single-channel planes: torch's CPU bilinear resize is 2-3x faster on
    # (N*C, 1, H, W) than on RGB batches (same float32 weights; sums can differ in the last bit)
    planes = x.reshape(-1, 1, *x.shape[-2:])
    out = planes.clone()  # the zoom by factors[0] = 1 is the image itself
    for z in factors[1:]:
        out += clipped_zoom(planes, float(z))
    return ((planes + out) / (len(factors) + 1)).reshape(x.shape)
