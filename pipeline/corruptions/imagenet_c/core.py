"""`corrupt` for RGB images: the suite's names, the constant table a size gets, uint8 in and out.

    from pipeline.corruptions.imagenet_c import corrupt
    y = corrupt(images, "defocus_blur", 3, sample_ids, seed=0)   # uint8 (N, 3, H, W) -> same

Size rule (docs/corruptions.md): images with min(H, W) <= 64 get the `cifar` table of
`make_cifar_c.py` (written for 32x32), larger ones the `imagenet` table of `make_imagenet_c.py`
(written for 224x224); constants measured in pixels are then scaled by `size_scale`
(min(H, W) / 32 or / 224; each corruption reads it from its batch's shape), so at 32x32 and 224x224 they are exactly the reference's.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.corruptions.core import SEVERITIES, check_ids_and_seed, sample_rngs
from pipeline.corruptions.imagenet_c.filters import CACHE_VALUES, is_small
from pipeline.corruptions.imagenet_c.registry import RGB_CORRUPTIONS
from pipeline.errors import TTTPipeError

__all__ = ["COMMON", "VALIDATION", "ALL", "CIFAR_MAX_SIDE", "table_for", "size_scale", "corrupt",
           "quantise"]

# imagecorruptions' order: noise, blur, weather, digital; then the four kept for validation.
COMMON: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression")
VALIDATION: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL: tuple[str, ...] = COMMON + VALIDATION

CIFAR_MAX_SIDE = 64  # min(H, W) <= 64 -> the cifar table
_REFERENCE_SIDE = {"cifar": 32, "imagenet": 224}
_CHUNK = 64  # images per vectorised step: bounds memory, never changes results
# values per step of a `per_pixel` corruption: its temporaries are reused from step to step
# instead of fresh full-batch allocations (page faults); never changes results
_PER_PIXEL_VALUES = 4 * CACHE_VALUES


def table_for(height: int, width: int) -> str:
    """Which constant table an image size gets: "cifar" (min side <= 64) or "imagenet"."""
    return "cifar" if min(height, width) <= CIFAR_MAX_SIDE else "imagenet"


def size_scale(height: int, width: int) -> float:
    """min(H, W) over the table's reference side: 1.0 at exactly 32x32 / 224x224."""
    return min(height, width) / _REFERENCE_SIDE[table_for(height, width)]


def quantise(y: torch.Tensor, out: np.ndarray | None = None) -> np.ndarray:
    """Float pixel units -> uint8 as the reference's `np.uint8(clip(y, 0, 1) * 255)` (truncation).

    The 1e-3 guards values that are exact integers in the reference (uint8 round trips such as
    jpeg, pixelate) against float32 rounding just below the integer. Written into `out` (a
    uint8 array shaped like `y`) when given, about one 224x224 image at a time (the
    temporaries stay in cache; the values are the same).
    """
    # clamp(y * 255 + 1e-3, 0, 255) then truncation = floor(clip(y, 0, 1) * 255 + 1e-3)
    if out is None:
        return (y * 255.0).add_(1e-3).clamp_(0.0, 255.0).to(torch.uint8).numpy()
    if is_small(*y.shape[-2:]):  # small: one step beats cache steps
        out[...] = (y * 255.0).add_(1e-3).clamp_(0.0, 255.0).to(torch.uint8).numpy()
        return out
    dest = torch.from_numpy(out)
    step = max(1, CACHE_VALUES // max(y[0].numel(), 1))
    for i in range(0, len(y), step):
        dest[i:i + step].copy_((y[i:i + step] * 255.0).add_(1e-3).clamp_(0.0, 255.0))  # truncates
    return out


def _check(images, sample_ids, seed) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[1] != 3:
        raise TTTPipeError(f"imagenet-c corruptions need RGB images shaped (N, 3, H, W), got {x.shape}; "
                           "grayscale data uses the mnist-c suite")
    if x.dtype != np.uint8:
        raise TTTPipeError(f"imagenet-c corruptions need uint8 images, got dtype {x.dtype}; "
                           "pass the split's uint8 pixels")
    if min(x.shape[2:]) < 4:
        raise TTTPipeError(f"imagenet-c corruptions need images of at least 4x4 pixels, got {x.shape[2:]}")
    ids = check_ids_and_seed(sample_ids, len(x), seed)
    return x, ids


def corrupt(images: np.ndarray, name: str, severity: int, sample_ids, seed: int) -> np.ndarray:
    """Corrupt uint8 RGB images (N, 3, H, W) -> uint8 (N, 3, H, W).

    Deterministic per (seed, name, severity, sample_id); a sample's output never depends on
    its batch. `identity` returns a copy and ignores `severity`. The input is never modified.
    """
    if name != "identity" and name not in ALL:
        raise TTTPipeError(f"unknown imagenet-c corruption {name!r}; choose from: {', '.join(ALL)}")
    x, ids = _check(images, sample_ids, seed)
    if name == "identity":
        return x.copy()
    if name not in RGB_CORRUPTIONS:
        raise TTTPipeError(f"imagenet-c corruption {name!r} is not implemented in this build; "
                           f"available: {', '.join(n for n in ALL if n in RGB_CORRUPTIONS)}")
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise TTTPipeError(f"severity {severity!r} is out of range for {name}; valid severities are 1-5")
    severity = int(severity)
    entry = RGB_CORRUPTIONS[name]
    height, width = x.shape[2:]
    params = getattr(entry, table_for(height, width))[severity - 1]
    out = np.empty(x.shape, dtype=np.uint8)
    chunk = _CHUNK
    if getattr(entry.fn, "per_pixel", False):  # cheap per-pixel work: small, cache-sized steps
        chunk = int(min(_CHUNK, max(1, _PER_PIXEL_VALUES // max(x[0].size, 1))))
    for start in range(0, len(x), chunk):
        part = slice(start, start + chunk)
        rngs = sample_rngs(seed, name, severity, ids[part]) if entry.random else []
        if getattr(entry.fn, "uint8_native", False):  # uint8 in, written into `out` (Pillow's)
            entry.fn(torch.from_numpy(x[part]), rngs, out=out[part], **params)
            continue
        batch = torch.from_numpy(x[part]).to(torch.float32).div_(255.0)  # (n, 3, H, W)
        quantise(entry.fn(batch, rngs, **params), out[part])
    return out
