"""The ImageNet-C / CIFAR-10-C corruptions for RGB images of any size (uint8 in, uint8 out).

    from pipeline.corruptions.imagenet_c import ALL, COMMON, VALIDATION, corrupt
    y = corrupt(images, "zoom_blur", 3, sample_ids, seed=0)

Each corruption registers into `registry.RGB_CORRUPTIONS` on import, family by family, in
imagecorruptions' order (no directory scanning). docs/corruptions.md describes every one.
"""

from __future__ import annotations

# Registration happens on import, family by family (no directory scanning).
from pipeline.corruptions.imagenet_c import blur, digital, noise, weather  # noqa: F401
from pipeline.corruptions.imagenet_c.core import (ALL, CIFAR_MAX_SIDE, COMMON, VALIDATION, corrupt,
                                                  size_scale, table_for)
from pipeline.corruptions.imagenet_c.registry import RGB_CORRUPTIONS, RGBCorruption

__all__ = ["ALL", "COMMON", "VALIDATION", "CIFAR_MAX_SIDE", "RGB_CORRUPTIONS", "RGBCorruption",
           "corrupt", "size_scale", "table_for"]
