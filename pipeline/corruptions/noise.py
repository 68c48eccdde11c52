"""Pixel noise: Gaussian (the seeds' corruption), shot (Poisson) and impulse (salt & pepper)."""

from __future__ import annotations

import numpy as np

from pipeline.corruptions.core import draw, register

__all__ = ["gaussian_noise", "shot_noise", "impulse_noise"]

_SHAPE = (28, 28)


@register("gaussian_noise", "x + N(0, (std_normalised * norm_std)^2), not clipped", clip=False)
def gaussian_noise(x, rngs, *, norm_std, std_normalised):
    """Additive Gaussian noise with std `std_normalised` in normalised units, i.e.
    `std_normalised * norm_std` in pixel units; severity 5 (std 2) is exactly the seed
    tutorials' `data += 2 * torch.randn(...)` after `Normalize(mean, norm_std)`."""
    noise = draw(rngs, lambda g: g.standard_normal(_SHAPE))  # float64 draws, (N, 28, 28)
    return (x + noise * (std_normalised * norm_std)).astype(np.float32)


@register("shot_noise", "Poisson(photons * x) / photons (MNIST-C)")
def shot_noise(x, rngs, *, norm_std, photons):
    lam = np.clip(x, 0.0, None).astype(np.float64) * photons
    counts = np.stack([g.poisson(lam_i) for g, lam_i in zip(rngs, lam)])
    return (counts / photons).astype(np.float32)


@register("impulse_noise", "salt & pepper on a fraction `amount` of the pixels (MNIST-C)")
def impulse_noise(x, rngs, *, norm_std, amount):
    u = draw(rngs, lambda g: g.random((2, *_SHAPE)))  # (N, 2, 28, 28)
    flipped, salt = u[:, 0] < amount, u[:, 1] < 0.5
    out = x.copy()
    out[flipped & salt] = 1.0
    out[flipped & ~salt] = 0.0
    return out
