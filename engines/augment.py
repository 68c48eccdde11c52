"""Seeded test-time augmentations on pixel-unit tensors of any size and channel count, in torch:
AugMix (MEMO's marginal-entropy views) and CoTTA's augmentation set. All draws come from a
CPU `torch.Generator`, so a seed gives the same views on every device.

AugMix (Hendrycks et al. 2020; google-research/augmix `augmentations.py`, as used by MEMO's
`third_party.py`): the operations that do not overlap the corruptions — autocontrast,
equalize, posterize, rotate, solarize, shear x/y, translate x/y (fill 128/255) — in 3 chains of
1-3 operations mixed with Dirichlet(1,1,1) weights, then blended with the (pre-augmented:
random crop with H/8 zero padding + horizontal flip, MEMO's CIFAR preaugment) image with a
Beta(1,1) weight; operation strengths from `severity` (AugMix default 3) on AugMix's 0..10 scale.

CoTTA (Wang et al. 2022, qinenergy/cotta `my_transforms.get_tta_transforms`): colour jitter
in random order (brightness 0.6-1.4, contrast 0.7-1.3, saturation 0.5-1.5, hue +-0.06, gamma
0.7-1.3), edge-padded random affine (+-15 degrees, translate 1/16 of the padded size, scale
0.9-1.1), Gaussian blur (5x5, sigma 0.001-0.5), horizontal flip p 0.5, Gaussian noise std
0.005, clip to [0, 1]; one draw per call, applied to the whole batch (as torchvision does on a
batch tensor). Saturation and hue need 3 channels (skipped otherwise); hue rotates the
chroma in YIQ space (torchvision converts to HSV: close, not identical).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["augmix", "cotta_augment"]


def _u(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _sign(g: torch.Generator) -> float:
    return -1.0 if _u(g) > 0.5 else 1.0


def _affine(x: torch.Tensor, theta: list[list[float]], fill: float | None) -> torch.Tensor:
    """x (N, C, H, W) resampled (bilinear) at theta @ (u, v, 1) in normalised coordinates;
    outside: `fill`, or the edge pixel (fill None)."""
    t = torch.tensor(theta, dtype=x.dtype, device=x.device).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(t, list(x.shape), align_corners=False)
    if fill is None:
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                             align_corners=False)
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False) + fill


def _level(g: torch.Generator, severity: float) -> float:
    return _u(g, 0.1, severity)  # AugMix's sample_level


def _autocontrast(x, g, s):
    lo = x.amin((-2, -1), keepdim=True)
    hi = x.amax((-2, -1), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp(min=1e-12), x)


def _equalize(x, g, s):
    q = (x * 255).round().clamp(0, 255).long()
    out = torch.empty_like(x)
    for c in range(x.shape[1]):
        v = q[:, c].flatten()
        cdf = torch.bincount(v, minlength=256).cumsum(0).to(x.dtype)
        lo = cdf[cdf > 0][0]
        lut = ((cdf - lo) / (cdf[-1] - lo).clamp(min=1)).clamp(0, 1)
        out[:, c] = lut[q[:, c]]
    return out


def _posterize(x, g, s):
    shift = 8 - (4 - int(_level(g, s) * 4 / 10))
    q = (x * 255).round().long() >> shift << shift
    return q.to(x.dtype) / 255


def _solarize(x, g, s):
    threshold = (256 - int(_level(g, s) * 256 / 10)) / 255
    return torch.where(x < threshold, x, 1 - x)


def _rotate(x, g, s):
    a = math.radians(int(_level(g, s) * 30 / 10) * _sign(g))
    h, w = x.shape[-2:]
    return _affine(x, [[math.cos(a), -math.sin(a) * h / w, 0],
                       [math.sin(a) * w / h, math.cos(a), 0]], 128 / 255)


def _shear(axis):
    def op(x, g, s):
        k = _level(g, s) * 0.3 / 10 * _sign(g)
        h, w = x.shape[-2:]
        theta = [[1, k * h / w, 0], [0, 1, 0]] if axis == 0 else [[1, 0, 0], [k * w / h, 1, 0]]
        return _affine(x, theta, 128 / 255)
    return op


def _translate(axis):
    def op(x, g, s):
        size = x.shape[-1 - axis]
        shift = 2 * int(_level(g, s) * size / 3 / 10) * _sign(g) / size
        theta = [[1, 0, shift], [0, 1, 0]] if axis == 0 else [[1, 0, 0], [0, 1, shift]]
        return _affine(x, theta, 128 / 255)
    return op


_AUGMIX_OPS = [_autocontrast, _equalize, _posterize, _rotate, _solarize, _shear(0), _shear(1),
               _translate(0), _translate(1)]


def _preaugment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crop with H/8 (W/8) zero padding, then a horizontal flip with probability 0.5."""
    h, w = x.shape[-2:]
    ph, pw = max(h // 8, 1), max(w // 8, 1)
    dy = int(torch.randint(2 * ph + 1, (), generator=g))
    dx = int(torch.randint(2 * pw + 1, (), generator=g))
    x = F.pad(x, (pw, pw, ph, ph))[..., dy:dy + h, dx:dx + w]
    return x.flip(-1) if _u(g) < 0.5 else x


def augmix(image: torch.Tensor, g: torch.Generator, severity: float = 3.0,
           width: int = 3) -> torch.Tensor:
    """One AugMix view of `image` (C, H, W) in [0, 1] -> (C, H, W)."""
    x = _preaugment(image[None], g)
    w = -torch.log(torch.rand(width, generator=g).clamp(min=1e-12))  # Dirichlet(1, ..., 1)
    w = (w / w.sum()).tolist()
    m = _u(g)                                                          # Beta(1, 1)
    mix = torch.zeros_like(x)
    for i in range(width):
        chain = x
        for _ in range(int(torch.randint(1, 4, (), generator=g))):
            op = _AUGMIX_OPS[int(torch.randint(len(_AUGMIX_OPS), (), generator=g))]
            chain = op(chain, g, severity)
        mix = mix + w[i] * chain
    return (m * x + (1 - m) * mix)[0].clamp(0, 1)  # a convex mix, up to rounding (-3e-9 seen)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != 3:
        return x.mean(1, keepdim=True)
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]


def _hue(x: torch.Tensor, shift: float) -> torch.Tensor:
    m = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                     dtype=x.dtype, device=x.device)
    a = 2 * math.pi * shift
    rot = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)],
                        [0, math.sin(a), math.cos(a)]], dtype=x.dtype, device=x.device)
    full = torch.linalg.inv(m) @ rot @ m
    return torch.einsum("ij,njhw->nihw", full, x)


def cotta_augment(x: torch.Tensor, g: torch.Generator, gaussian_std: float = 0.005
                  ) -> torch.Tensor:
    """One CoTTA view of the batch x (N, C, H, W) in [0, 1] (the same draw for every image)."""
    x = x.clamp(0, 1)
    for k in torch.randperm(5, generator=g).tolist():
        if k == 0:
            x = (x * _u(g, 0.6, 1.4)).clamp(0, 1)
        elif k == 1:
            f = _u(g, 0.7, 1.3)
            x = (f * x + (1 - f) * _gray(x).mean((-3, -2, -1), keepdim=True)).clamp(0, 1)
        elif k == 2:
            f = _u(g, 0.5, 1.5)
            x = (f * x + (1 - f) * _gray(x)).clamp(0, 1) if x.shape[1] == 3 else x
        elif k == 3:
            shift = _u(g, -0.06, 0.06)
            x = _hue(x, shift).clamp(0, 1) if x.shape[1] == 3 else x
        else:
            x = x.clamp(1e-8, 1.0) ** _u(g, 0.7, 1.3)
    h, w = x.shape[-2:]
    a = math.radians(_u(g, -15, 15))
    scale = _u(g, 0.9, 1.1)
    tx, ty = _u(g, -1, 1) * 2 * w / 16, _u(g, -1, 1) * 2 * h / 16  # pixels of the padded image
    c, s = math.cos(a) / scale, math.sin(a) / scale
    x = _affine(x, [[c, -s * h / w, -2 * tx / w], [s * w / h, c, -2 * ty / h]], None)
    sigma = _u(g, 0.001, 0.5)
    k = torch.exp(-(torch.arange(5, dtype=x.dtype, device=x.device) - 2) ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    n, ch = x.shape[:2]
    flat = F.pad(x.reshape(n * ch, 1, h, w), (2, 2, 2, 2), mode="reflect" if min(h, w) > 2
                 else "replicate")
    x = F.conv2d(F.conv2d(flat, k.view(1, 1, 1, 5)), k.view(1, 1, 5, 1)).reshape(n, ch, h, w)
    if _u(g) < 0.5:
        x = x.flip(-1)
    noise = torch.randn(x.shape, generator=g).to(x) * gaussian_std
    return (x + noise).clamp(0, 1)
