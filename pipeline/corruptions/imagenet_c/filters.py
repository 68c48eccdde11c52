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

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["torch_generators", "per_sample", "border_index", "pad", "gaussian_kernel1d",
           "filter_matrix", "separable_filter", "gaussian_filter", "bilinear", "filter2d"]


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


_MATRIX_TAPS = 48  # longer kernels run as one (n x n) matrix product per axis


def filter_matrix(n: int, kernel: np.ndarray, mode: str) -> np.ndarray:
    """The (n, n) matrix of correlating a length-n axis with `kernel` under border `mode`."""
    r = len(kernel) // 2
    src = border_index(n, r, r, mode).numpy()  # padded position -> source index
    m = np.zeros((n, n), dtype=np.float64)
    for t, weight in enumerate(kernel):  # output i reads padded position i + t
        np.add.at(m, (np.arange(n), src[t:t + n]), weight)
    return m


def separable_filter(x: torch.Tensor, kh: np.ndarray, kw: np.ndarray, mode: str) -> torch.Tensor:
    """Correlate the last two axes of `x` (..., H, W) with kh (rows) then kw (columns)."""
    shape = x.shape
    if max(len(kh), len(kw)) > _MATRIX_TAPS:
        mh = torch.from_numpy(filter_matrix(shape[-2], kh, mode)).to(x.dtype)
        mw = torch.from_numpy(filter_matrix(shape[-1], kw, mode)).to(x.dtype)
        return mh @ x @ mw.T
    y = x.reshape(-1, 1, *shape[-2:])
    rh, rw = len(kh) // 2, len(kw) // 2
    wh = torch.as_tensor(kh, dtype=x.dtype).view(1, 1, -1, 1)
    ww = torch.as_tensor(kw, dtype=x.dtype).view(1, 1, 1, -1)
    y = F.conv2d(pad(y, (rh, rh), (0, 0), mode), wh)
    y = F.conv2d(pad(y, (0, 0), (rw, rw), mode), ww)
    return y.reshape(shape)


def gaussian_filter(x: torch.Tensor, sigma: float, mode: str = "nearest",
                    truncate: float = 4.0) -> torch.Tensor:
    """skimage.filters.gaussian / scipy gaussian_filter over the last two axes (default 'nearest').

    As scipy, a sigma of at most 1e-15 leaves the image as it is."""
    if sigma <= 1e-15:
        return x.clone()
    k = gaussian_kernel1d(sigma, truncate)
    return separable_filter(x, k, k, mode)


def filter2d(x: torch.Tensor, kernel: np.ndarray, mode: str = "reflect101") -> torch.Tensor:
    """cv2.filter2D (correlation, centred anchor, BORDER_REFLECT_101 by default) via the FFT."""
    kh, kw = kernel.shape
    rh, rw = kh // 2, kw // 2
    shape = x.shape
    y = pad(x.reshape(-1, *shape[-2:]), (rh, rh), (rw, rw), mode)  # (B, H + 2rh, W + 2rw)
    ph, pw = y.shape[-2:]
    k = torch.zeros(ph, pw, dtype=torch.float64)
    # correlation = convolution with the flipped kernel; centre it at (0, 0) circularly
    k[:kh, :kw] = torch.from_numpy(np.ascontiguousarray(kernel[::-1, ::-1], dtype=np.float64))
    k = torch.roll(k, shifts=(-rh, -rw), dims=(0, 1))
    spec = torch.fft.rfft2(y.to(torch.float64)) * torch.fft.rfft2(k)
    out = torch.fft.irfft2(spec, s=(ph, pw))[:, rh:rh + shape[-2], rw:rw + shape[-1]]
    return out.to(x.dtype).reshape(shape)


def bilinear(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, mode: str) -> torch.Tensor:
    """Sample x (N, C, H, W) at float coordinates rows, cols (N, H', W') by bilinear
    interpolation (scipy map_coordinates order=1); neighbours outside the image come from
    `mode`'s extension ("reflect": symmetric, "reflect101": mirror)."""
    n, c, h, w = x.shape
    r0, c0 = torch.floor(rows), torch.floor(cols)
    fr, fc = (rows - r0).to(x.dtype), (cols - c0).to(x.dtype)
    r0, c0 = r0.to(torch.int64), c0.to(torch.int64)
    flat = x.reshape(n, c, h * w)

    def fold(i, size):
        if mode == "reflect":
            i = torch.remainder(i, 2 * size)
            return torch.where(i >= size, 2 * size - 1 - i, i)
        i = torch.remainder(i, 2 * size - 2) if size > 1 else torch.zeros_like(i)
        return torch.where(i >= size, 2 * size - 2 - i, i)

    def at(ri, ci):
        idx = (fold(ri, h) * w + fold(ci, w)).reshape(n, 1, -1).expand(n, c, -1)
        return flat.gather(2, idx).reshape(n, c, *rows.shape[1:])

    fr, fc = fr[:, None], fc[:, None]
    top = at(r0, c0) * (1 - fc) + at(r0, c0 + 1) * fc
    bottom = at(r0 + 1, c0) * (1 - fc) + at(r0 + 1, c0 + 1) * fc
    return top * (1 - fr) + bottom * fr
