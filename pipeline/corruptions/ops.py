"""Batched image operations the corruptions share. Every function maps (N, H, W) -> (N, H, W)
and treats each image on its own (no filter or reduction crosses the batch axis)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["blur", "gather", "warp", "affine_warp", "line_band", "polyline_band", "band_along",
           "plasma_fractal", "canny"]

_NO_BATCH_LINK = np.zeros((3, 3, 3), dtype=bool)
_NO_BATCH_LINK[1] = True  # 8-connectivity inside an image, none across images


def blur(x: np.ndarray, sigma: float, mode: str = "nearest") -> np.ndarray:
    """Gaussian blur of each image (scikit-image's defaults: mode 'nearest', truncate 4)."""
    return ndimage.gaussian_filter(x, sigma=(0.0, sigma, sigma), mode=mode, truncate=4.0)


def gather(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """`x[n, rows[n, ...], cols[n, ...]]` for in-range integer indices (one flat take per image)."""
    n, h, w = x.shape
    flat = (rows * w + cols).reshape(n, -1)
    return np.take_along_axis(x.reshape(n, h * w), flat, axis=1).reshape(rows.shape)


def warp(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Bilinear sampling `out[n, i, j] = x[n, rows[n, i, j], cols[n, i, j]]`, zero outside."""
    n, h, w = x.shape
    r0, c0 = np.floor(rows), np.floor(cols)
    fr, fc = (rows - r0).astype(np.float32), (cols - c0).astype(np.float32)
    r0, c0 = r0.astype(np.int64), c0.astype(np.int64)
    out = np.zeros(rows.shape, dtype=np.float32)
    for dr, wr in ((0, 1 - fr), (1, fr)):
        for dc, wc in ((0, 1 - fc), (1, fc)):
            r, c = r0 + dr, c0 + dc
            inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
            vals = gather(x, np.clip(r, 0, h - 1), np.clip(c, 0, w - 1))
            out += np.where(inside, vals, 0.0) * (wr * wc)
    return out


def affine_warp(x: np.ndarray, matrix: np.ndarray, shift: np.ndarray | None = None) -> np.ndarray:
    """Resample each image through its own affine map about the image centre.

    `matrix` (N, 2, 2) maps an output pixel's (col, row) offset from the centre to the source
    offset (scikit-image's `warp(inverse_map=AffineTransform(...))` with the centre held fixed,
    as MNIST-C does); `shift` (N, 2) adds a (col, row) translation to the source position.
    """
    n, h, w = x.shape
    centre = (h - 1) / 2.0
    rr, cc = np.mgrid[0:h, 0:w].astype(np.float64) - centre  # (H, W) each
    m = matrix[:, :, :, None, None]  # (N, 2, 2, 1, 1)
    src_c = m[:, 0, 0] * cc + m[:, 0, 1] * rr + centre
    src_r = m[:, 1, 0] * cc + m[:, 1, 1] * rr + centre
    if shift is not None:
        src_c = src_c + shift[:, 0, None, None]
        src_r = src_r + shift[:, 1, None, None]
    return warp(x, src_r, src_c)


def line_band(c0, r0, c1, r1, size: int = 28) -> np.ndarray:
    """MNIST-C's anti-aliased line between (c0, r0) and (c1, r1), one per sample: (N, H, W).

    Zero left of floor(c0) and right of ceil(c1); a vertical segment (c0 == c1) draws nothing.
    """
    c0, r0, c1, r1 = (np.asarray(v, dtype=np.float64)[:, None] for v in (c0, r0, c1, r1))
    cols = np.arange(size, dtype=np.float64)[None, :]
    flat = c1 == c0
    slope = np.where(flat, 0.0, (r1 - r0) / np.where(flat, 1.0, c1 - c0))
    keep = (cols >= np.floor(c0)) & (cols < np.ceil(c1)) & ~flat
    return band_along(slope * (cols - c0) + r0, keep)


def polyline_band(cols: np.ndarray, rows: np.ndarray, size: int = 28) -> np.ndarray:
    """MNIST-C's line profile along a polyline whose vertices (N, P) go left to right.

    Repeated trailing vertices are allowed (they add nothing); each column uses the segment
    that spans it, extended at the ends to floor(first col) .. ceil(last col).
    """
    n, p = cols.shape
    grid = np.arange(size, dtype=np.float64)[None, :]
    last = np.maximum((np.diff(cols, axis=1) > 0).sum(1) - 1, 0)[:, None]  # last real segment
    seg = np.minimum((cols[:, 1:-1, None] <= grid[:, None, :]).sum(1), last)  # (N, W)
    ca, cb = np.take_along_axis(cols, seg, 1), np.take_along_axis(cols, seg + 1, 1)
    ra, rb = np.take_along_axis(rows, seg, 1), np.take_along_axis(rows, seg + 1, 1)
    slope = (rb - ra) / np.where(cb > ca, cb - ca, 1.0)
    keep = (grid >= np.floor(cols[:, :1])) & (grid < np.ceil(cols[:, -1:]))
    return band_along(ra + slope * (grid - ca), keep)


def band_along(centre: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Intensity `clip(log(1 - d / 2.3) + 1, 0, 1)` at vertical distance d from the row
    `centre[n, col]` (N, W), in the columns where `keep` (N, W): (N, W, W)."""
    size = centre.shape[1]
    rows = np.arange(size, dtype=np.float64)[None, :, None]
    dist = np.clip(np.abs(rows - centre[:, None, :]), 0.0, 2.3 - 1e-10)
    band = np.clip(np.log1p(-dist / 2.3) + 1.0, 0.0, 1.0)
    return np.where(keep[:, None, :], band, 0.0)


def plasma_fractal(uniforms: np.ndarray, size: int, decay: float) -> np.ndarray:
    """Diamond-square height maps (MNIST-C's `plasma_fractal`), one per sample, in [0, 1].

    `uniforms` (N, K) in [-1, 1) with K >= size**2 - 1 feed the random offsets; the map is
    periodic with side `size` (a power of two) and is normalised per sample to [0, 1].
    """
    n = len(uniforms)
    grid = np.zeros((n, size, size))
    used = 0

    def offsets(shape):
        nonlocal used
        k = shape[1] * shape[2]
        u = uniforms[:, used:used + k].reshape(shape)
        used += k
        return u

    step, wibble = size, 100.0
    while step >= 2:
        half = step // 2
        corners = grid[:, 0:size:step, 0:size:step]
        sq = corners + np.roll(corners, -1, axis=1)
        sq = sq + np.roll(sq, -1, axis=2)
        grid[:, half:size:step, half:size:step] = sq / 4 + wibble * wibble * offsets(sq.shape)
        centres = grid[:, half:size:step, half:size:step]
        corners = grid[:, 0:size:step, 0:size:step]
        lr = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2)
        grid[:, 0:size:step, half:size:step] = lr / 4 + wibble * wibble * offsets(lr.shape)
        tb = centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1)
        grid[:, half:size:step, 0:size:step] = tb / 4 + wibble * wibble * offsets(tb.shape)
        step //= 2
        wibble /= decay
    grid -= grid.min(axis=(1, 2), keepdims=True)
    return grid / np.maximum(grid.max(axis=(1, 2), keepdims=True), 1e-12)


def _sobel(x: np.ndarray, axis: int) -> np.ndarray:
    """Sobel derivative along image `axis` (1 or 2), smoothing along the other image axis only
    (`ndimage.sobel` would also smooth across the batch axis)."""
    other = 3 - axis
    diff = ndimage.correlate1d(x, [-1.0, 0.0, 1.0], axis=axis, mode="reflect")
    return ndimage.correlate1d(diff, [1.0, 2.0, 1.0], axis=other, mode="reflect")


def canny(x: np.ndarray, sigma: float, low: float = 0.1, high: float = 0.2) -> np.ndarray:
    """Canny edges of each image as 0/1 floats (scikit-image's `feature.canny` defaults).

    Gaussian smoothing (zero outside, renormalised at the border), Sobel gradients,
    non-maximum suppression along the quantised gradient direction, hysteresis with
    8-connected components; the outermost pixel ring never holds an edge.
    """
    n, h, w = x.shape
    ones = np.ones((1, h, w))
    smooth = blur(x.astype(np.float64), sigma, mode="constant") / blur(ones, sigma, mode="constant")
    gy = _sobel(smooth, axis=1)
    gx = _sobel(smooth, axis=2)
    mag = np.hypot(gx, gy)
    pad = np.pad(mag, ((0, 0), (1, 1), (1, 1)))

    def neighbour(dr, dc):
        return pad[:, 1 + dr:1 + dr + h, 1 + dc:1 + dc + w]

    angle = np.mod(np.degrees(np.arctan2(gy, gx)), 180.0)  # direction of the gradient
    sector = np.digitize(angle, [22.5, 67.5, 112.5, 157.5]) % 4  # 0: -, 1: \, 2: |, 3: /
    is_max = np.zeros(mag.shape, dtype=bool)
    for s, (dr, dc) in enumerate([(0, 1), (1, 1), (1, 0), (1, -1)]):
        peak = (mag >= neighbour(dr, dc)) & (mag >= neighbour(-dr, -dc))
        is_max |= (sector == s) & peak
    is_max[:, [0, -1], :] = False
    is_max[:, :, [0, -1]] = False
    weak = is_max & (mag >= low)
    labels, count = ndimage.label(weak, structure=_NO_BATCH_LINK)
    strong = np.zeros(count + 1, dtype=bool)
    strong[np.unique(labels[weak & (mag >= high)])] = True
    strong[0] = False
    return strong[labels].astype(np.float32)
