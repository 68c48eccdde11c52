"""Batch augmentation on the training device: seeded torch ops, no per-sample Python loop.

- ``cifar``: random crop with 4 pixels of zero padding + horizontal flip (the CIFAR recipe).
- ``imagenet``: random-resized crop (scale 0.08-1, aspect 3/4-4/3, bilinear) back to the
  input size + horizontal flip.
Inputs and outputs are float pixel units (N, C, H, W); randomness comes only from `generator`
(a torch.Generator on the batch's device), so a run is reproducible and resumable.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["AUGMENTS", "augment_batch", "random_crop_flip", "random_resized_crop_flip"]

AUGMENTS = ("none", "cifar", "imagenet")


def _uniform(n: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device)


def _flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    mask = _uniform(len(x), generator, x.device) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    n, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dev = x.device
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, :, None]   # (N, H, 1)
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, :]   # (N, 1, W)
    out = padded[torch.arange(n, device=dev)[:, None, None], :, rows, cols]  # (N, H, W, C)
    return _flip(out.permute(0, 3, 1, 2).contiguous(), generator)


def random_resized_crop_flip(x: torch.Tensor, generator: torch.Generator,
                             scale: tuple[float, float] = (0.08, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """One box per image (area share in `scale`, log-uniform aspect in `ratio`), resampled to H x W.

    Boxes that would not fit are clipped to the image (torchvision retries, then falls back
    to a centre crop; clipping keeps it one tensor op and the same distribution of centres).
    """
    n, _, h, w = x.shape
    dev = x.device
    area = scale[0] + (scale[1] - scale[0]) * _uniform(n, generator, dev)
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * _uniform(n, generator, dev)
    aspect = torch.exp(log_r)
    bw = torch.sqrt(area * aspect).clamp(max=1.0)   # box width / image width
    bh = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (1 - bw) * _uniform(n, generator, dev) * 2 - (1 - bw)  # box centre in [-1, 1] coordinates
    cy = (1 - bh) * _uniform(n, generator, dev) * 2 - (1 - bh)
    theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = bw.to(x.dtype), cx.to(x.dtype)
    theta[:, 1, 1], theta[:, 1, 2] = bh.to(x.dtype), cy.to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return _flip(out, generator)


def augment_batch(x: torch.Tensor, kind: str, generator: torch.Generator | None) -> torch.Tensor:
    if kind == "none":
        return x
    if kind == "cifar":
        return random_crop_flip(x, generator)
    if kind == "imagenet":
        return random_resized_crop_flip(x, generator)
    raise ValueError(f"unknown augmentation {kind!r}; choose one of {', '.join(AUGMENTS)}")
