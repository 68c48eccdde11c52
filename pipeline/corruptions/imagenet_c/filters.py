"""Torch building blocks shared by the RGB corruptions: per-sample torch generators, border
padding as scipy/OpenCV name it, separable and FFT convolution over a batch (N, C, H, W).

Border modes, by their owners' names:
- "nearest"   scipy's nearest = OpenCV's BORDER_REPLICATE (a a | a b c | c c)
- "reflect"   scipy's reflect (half-sample symmetric, d c b a | a b c d | d c b a)
- "reflect101" OpenCV's BORDER_REFLECT_101 = scipy's mirror (c b | a b c | b a)
Padding is done by index arithmetic, so a kernel may be wider than the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import scipy.fft
import torch
import torch.nn.functional as F

__all__ = ["torch_generators", "per_sample", "border_index", "pad", "gaussian_kernel1d",
           "filter_matrix", "separable_filter", "gaussian_filter", "bilinear", "sample_at",
           "filter2d"]


def torch_generators(rngs: Sequence[np.random.Generator]) -> list[torch.Generator]:
    """One torch CPU generator per sample, seeded from that sample's numpy generator."""
    return [torch.Generator().manual_seed(int(r.integers(0, 2**63 - 1))) for r in rngs]


def per_sample(gens: Sequence[torch.Generator], draw) -> torch.Tensor:
    """Stack `draw(generator)` over the samples: (N, ...)."""
    return torch.stack([draw(g) for g in gens])


def border_index(n: int, before: int, after: int, mode: str) -> torch.Tensor:
    """Source indices 0..n-1 of a length-n axis padded by (before, after) under `mode`."""
    i = np.arange(-before, n + after)
    if mode == "nearest" or n == 1:
        j = np.clip(i, 0, n - 1)
    elif mode == "reflect":
        j = np.mod(i, 2 * n)
        j = np.where(j >= n, 2 * n - 1 - j, j)
    elif mode == "reflect101":
        j = np.mod(i, 2 * n - 2)
        j = np.where(j >= n, 2 * n - 2 - j, j)
    else:
        raise ValueError(f"unknown border mode {mode!r}")
    return torch.from_numpy(j.astype(np.int64))


def pad(x: torch.Tensor, ph: tuple[int, int], pw: tuple[int, int], mode: str) -> torch.Tensor:
    """Pad the last two axes of `x` by (top, bottom), (left, right) under `mode`."""
    h, w = x.shape[-2:]
    torch_mode = {"nearest": "replicate", "reflect101": "reflect"}.get(mode)
    if torch_mode and max(ph) < h and max(pw) < w:  # torch's own padding is faster
        shape = x.shape
        y = F.pad(x.reshape(-1, 1, h, w), (pw[0], pw[1], ph[0], ph[1]), mode=torch_mode)
        return y.reshape(*shape[:-2], *y.shape[-2:])
    if ph != (0, 0):
        x = x.index_select(-2, border_index(h, *ph, mode))
    if pw != (0, 0):
        x = x.index_select(-1, border_index(w, *pw, mode))
    return x


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage.gaussian_filter1d's weights: radius int(truncate * sigma + 0.5), sum 1."""
    radius = int(truncate * float(sigma) + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 / (float(sigma) ** 2) * t * t)
    return k / k.sum()


_SLICE_TAPS = 15  # up to this many taps: shifted slices; longer: matrix products


@lru_cache(maxsize=128)
def _filter_matrix(n: int, kernel: tuple[float, ...], mode: str) -> torch.Tensor:
    r = len(kernel) // 2
    src = border_index(n, r, r, mode).numpy()  # padded position -> source index
    m = np.zeros((n, n), dtype=np.float64)
    for t, weight in enumerate(kernel):  # output i reads padded position i + t
        np.add.at(m, (np.arange(n), src[t:t + n]), weight)
    return torch.from_numpy(m)


def filter_matrix(n: int, kernel: np.ndarray, mode: str) -> torch.Tensor:
    """The (n, n) float64 matrix of correlating a length-n axis with `kernel` under `mode`."""
    return _filter_matrix(int(n), tuple(float(k) for k in kernel), mode)


def separable_filter(x: torch.Tensor, kh: np.ndarray, kw: np.ndarray, mode: str) -> torch.Tensor:
    """Correlate the last two axes of `x` (..., H, W) with kh (rows) then kw (columns).

    Short kernels: a sum of shifted slices of the padded image, a few planes at a time (the
    planes and their temporaries stay in cache; each value's arithmetic is the same whatever
    the chunk). Long ones: one banded (n x n) matrix product per axis (exact for any length
    and border). Both beat conv2d over single-channel planes on CPU by 5-10x."""
    if max(len(kh), len(kw)) <= _SLICE_TAPS:
        h, w = x.shape[-2:]
        planes = x.reshape(-1, h, w)
        step = _planes_per_step(h, w)
        if step >= len(planes):
            return _slice_filter(planes, kh, kw, mode).reshape(x.shape)
        out = torch.empty(planes.shape, dtype=x.dtype)
        for start in range(0, len(planes), step):
            out[start:start + step] = _slice_filter(planes[start:start + step], kh, kw, mode)
        return out.reshape(x.shape)
    mh = filter_matrix(x.shape[-2], kh, mode).to(x.dtype)
    mw = filter_matrix(x.shape[-1], kw, mode).to(x.dtype)
    step = 0  # leading-axis items per step (0: all at once)
    if x.dim() >= 3:
        planes_per_item = max(1, x[0].numel() // (x.shape[-2] * x.shape[-1]))
        step = _planes_per_step(*x.shape[-2:]) // planes_per_item
    if step == 0 or step >= len(x):
        return mh @ x @ mw.T
    out = torch.empty(x.shape, dtype=x.dtype)  # a few images at a time: buffers reused
    for start in range(0, len(x), step):
        torch.matmul(mh @ x[start:start + step], mw.T, out=out[start:start + step])
    return out


CACHE_VALUES = 3 * 224 * 224  # values per cache-sized step: one 224x224 RGB image
SMALL_PIXELS = 64 * 64  # images of at most H*W pixels go in one batched step (per-step overhead
# would cost more than the cache saves)


def is_small(height: int, width: int) -> bool:
    """Whether (H, W) images are small enough for one batched step (see SMALL_PIXELS)."""
    return height * width <= SMALL_PIXELS


def _planes_per_step(height: int, width: int) -> int:
    """Planes per cache-sized step; small planes (<= 64x64) go in one step (per-step
    overhead would cost more than the cache saves)."""
    if is_small(height, width):
        return 1 << 62
    return max(1, CACHE_VALUES // (height * width))


def _slice_filter(x: torch.Tensor, kh: np.ndarray, kw: np.ndarray, mode: str) -> torch.Tensor:
    h, w = x.shape[-2:]
    rh, rw = len(kh) // 2, len(kw) // 2
    xp = pad(x, (rh, rh), (0, 0), mode)
    y = xp[..., 0:h, :] * float(kh[0])
    for t in range(1, len(kh)):
        y.add_(xp[..., t:t + h, :], alpha=float(kh[t]))
    yp = pad(y, (0, 0), (rw, rw), mode)
    z = yp[..., 0:w] * float(kw[0])
    for t in range(1, len(kw)):
        z.add_(yp[..., t:t + w], alpha=float(kw[t]))
    return z


def gaussian_filter(x: torch.Tensor, sigma: float, mode: str = "nearest",
                    truncate: float = 4.0) -> torch.Tensor:
    """skimage.filters.gaussian / scipy gaussian_filter over the last two axes (default 'nearest').

    As scipy, a sigma of at most 1e-15 leaves the image as it is."""
    if sigma <= 1e-15:
        return x.clone()
    k = gaussian_kernel1d(sigma, truncate)
    return separable_filter(x, k, k, mode)


def _fast_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (FFT-friendly)."""
    best = 1 << (n - 1).bit_length()
    for three in (1, 3, 9, 27, 81):
        for five in (1, 5, 25, 125):
            m = three * five
            while m < n:
                m *= 2
            best = min(best, m)
    return best


@lru_cache(maxsize=32)
def _kernel_spectrum(kernel: tuple[tuple[float, ...], ...], size: tuple[int, int]) -> torch.Tensor:
    k = np.asarray(kernel, dtype=np.float64)
    kh, kw = k.shape
    full = torch.zeros(size, dtype=torch.float64)
    # correlation = convolution with the flipped kernel; centre it at (0, 0) circularly
    full[:kh, :kw] = torch.from_numpy(np.ascontiguousarray(k[::-1, ::-1]))
    full = torch.roll(full, shifts=(-(kh // 2), -(kw // 2)), dims=(0, 1))
    return torch.fft.rfft2(full.to(torch.float32))


def filter2d(x: torch.Tensor, kernel: np.ndarray, mode: str = "reflect101") -> torch.Tensor:
    """cv2.filter2D (correlation, centred anchor, BORDER_REFLECT_101 by default) via the FFT,
    about one 224x224 RGB image's planes at a time (the transforms' buffers are reused)."""
    kh, kw = kernel.shape
    rh, rw = kh // 2, kw // 2
    shape = x.shape
    planes = x.reshape(-1, *shape[-2:])
    size = (_fast_size(shape[-2] + 2 * rh), _fast_size(shape[-1] + 2 * rw))  # zero padding past the border
    spec = _kernel_spectrum(tuple(map(tuple, np.asarray(kernel, dtype=np.float64))), size)
    out = torch.empty(planes.shape, dtype=x.dtype)
    step = _planes_per_step(*shape[-2:])
    for start in range(0, len(planes), step):
        y = pad(planes[start:start + step], (rh, rh), (rw, rw), mode)  # (b, H + 2rh, W + 2rw)
        prod = (torch.fft.rfft2(y.to(torch.float32), s=size) * spec).numpy()
        # the inverse as two 1-D passes with scipy's pocketfft: 2x faster than
        # torch.fft.irfft2 on CPU (same float32 transform; results agree to ~1e-7)
        y = scipy.fft.irfft(scipy.fft.ifft(prod, axis=-2, overwrite_x=True), n=size[1], axis=-1,
                            overwrite_x=True)
        out[start:start + step] = torch.from_numpy(y[:, rh:rh + shape[-2], rw:rw + shape[-1]])
    return out.reshape(shape)


def bilinear(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, mode: str) -> torch.Tensor:
    """Sample x (N, C, H, W) at float coordinates rows, cols (N, H', W') by bilinear
    interpolation (scipy map_coordinates order=1) on the image extended by `mode`
    ("reflect": symmetric, scipy's reflect; "reflect101": mirror, OpenCV's REFLECT_101).
    See `sample_at`, which takes the coordinates already in one (N, H', W', 2) tensor."""
    grid = torch.empty((*rows.shape, 2), dtype=x.dtype)
    grid[..., 0], grid[..., 1] = cols, rows
    return sample_at(x, grid, mode)


def sample_at(x: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    """`bilinear` with the pixel coordinates (col, row) in `grid` (N, H', W', 2), which is
    overwritten (normalised in place for grid_sample).

    grid_sample's reflection padding folds the coordinate back into the image first; for a
    piecewise-linear extension that is the same value. align_corners picks the mirror line:
    False reflects about -0.5 and n - 0.5 (symmetric), True about 0 and n - 1 (mirror)."""
    h, w = x.shape[-2:]
    if mode not in ("reflect", "reflect101"):
        raise ValueError(f"unknown border mode {mode!r}")
    corners = mode == "reflect101"
    for axis, n in ((0, w), (1, h)):
        g = grid[..., axis]
        if corners:  # col * (2 / (w - 1)) - 1
            g.mul_(2.0 / max(n - 1, 1)).sub_(1)
        else:  # (2 col + 1) / w - 1
            g.mul_(2).add_(1).div_(n).sub_(1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=corners)
