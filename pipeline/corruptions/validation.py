"""The grayscale suite's validation corruptions: one per family, held out from reporting.

ImageNet-C (Hendrycks & Dietterich 2019) keeps four extra corruptions — speckle_noise,
gaussian_blur, spatter, saturate — for choosing hyper-parameters, so that the 15 reported ones
never steer a choice. The same idea for the grayscale suite: a noise (speckle_noise), a blur
(gaussian_blur), an intensity change (contrast; saturation has no grey equivalent) and a warp
(stretch; the geometric family is where rotation TTT loses most). They are registered with
`validation=True`: `list_corruptions()` and "all" leave them out, "validation" selects them.

speckle_noise, gaussian_blur and contrast follow ImageNet-C's definitions (x + x·N(0, c²);
a Gaussian filter of std c; (x - mean)·c + mean); their constants are scaled for 28x28
images in pipeline/corruptions/table.py (ImageNet-C's are for 224x224).
"""

from __future__ import annotations

import numpy as np

from pipeline.corruptions.core import draw, register
from pipeline.corruptions.ops import affine_warp, blur

__all__ = ["speckle_noise", "gaussian_blur", "contrast", "stretch"]


@register("speckle_noise", "x + x·N(0, std²) (ImageNet-C's speckle noise)", validation=True)
def speckle_noise(x, rngs, *, norm_std, std):
    noise = draw(rngs, lambda g: g.standard_normal(x.shape[1:]))  # (N, H, W) float64
    return (x + x * noise * std).astype(np.float32)


@register("gaussian_blur", "Gaussian filter of std `sigma` pixels (ImageNet-C's gaussian_blur)",
          random=False, validation=True)
def gaussian_blur(x, rngs, *, norm_std, sigma):
    return blur(x, sigma)


@register("contrast", "(x - mean) · factor + mean, per image (ImageNet-C's contrast)",
          random=False, validation=True)
def contrast(x, rngs, *, norm_std, factor):
    mean = x.mean(axis=(1, 2), keepdims=True)
    return (x - mean) * factor + mean


@register("stretch", "shrink one axis (random: rows or columns) by `factor` about the centre",
          validation=True)
def stretch(x, rngs, *, norm_std, factor):
    axis = (draw(rngs, lambda g: g.random()) < 0.5).astype(np.int64)  # (N,) 0: columns, 1: rows
    m = np.zeros((len(x), 2, 2))
    m[:, 0, 0] = m[:, 1, 1] = 1.0
    m[np.arange(len(x)), axis, axis] = 1.0 / factor  # sample a longer window: that axis shrinks
    return affine_warp(x, m)
