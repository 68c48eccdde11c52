"""The ImageNet-C / CIFAR-10-C corruption registry: one entry per corruption, two constant tables.

A corruption is `fn(x, rngs, **params) -> y` over a batch `x` (N, 3, H, W) float32 in [0, 1]
(a torch tensor), with `rngs` one `numpy.random.Generator` per sample (see
`pipeline.corruptions.core.sample_rngs`); `y` has the same shape, float32, and may leave
[0, 1]: clipping to [0, 1] and rounding to uint8 are the caller's (`imagenet_c.corrupt`).
A sample's output depends only on its own image and generator, never on the batch.

`params` are the constants of severity 1..5 in one of two tables, as Hendrycks' scripts
have them: `cifar` (`make_cifar_c.py`, 32x32) and `imagenet` (`make_imagenet_c.py`,
224x224). Each table is a tuple of five dicts of keyword arguments for `fn`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["RGBCorruption", "RGB_CORRUPTIONS", "register", "per_pixel"]

Params = tuple[dict, dict, dict, dict, dict]


@dataclass(frozen=True)
class RGBCorruption:
    name: str
    fn: Callable
    cifar: Params
    imagenet: Params
    random: bool
    summary: str


RGB_CORRUPTIONS: dict[str, RGBCorruption] = {}


def register(name: str, summary: str, *, cifar: Params, imagenet: Params, random: bool = True):
    """Register `fn` under `name` with its five severities' constants for both tables."""
    if len(cifar) != 5 or len(imagenet) != 5:
        raise ValueError(f"corruption {name!r} needs constants for exactly 5 severities")

    def deco(fn: Callable) -> Callable:
        if name in RGB_CORRUPTIONS:
            raise ValueError(f"RGB corruption {name!r} is already registered")
        RGB_CORRUPTIONS[name] = RGBCorruption(name, fn, tuple(cifar), tuple(imagenet), random,
                                              summary)
        return fn

    return deco


def per_pixel(fn: Callable) -> Callable:
    """Mark `fn` as cheap work per pixel (or per image): `corrupt` then feeds it a few images
    at a time, so its temporaries are reused from step to step rather than allocated for the
    whole batch. Results never depend on the batch, so they are the same."""
    fn.per_pixel = True
    return fn
