"""Helpers for the engine tests (a uniquely named module: `conftest` is ambiguous to import)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from helpers import synthetic_digits
from torch import nn

import engines

MODEL_FOR = {"ttt": "seed_cnn", "it3": "seed_rescnn"}  # each method's seed network


def digits(n: int, seed: int = 0, noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1, 28, 28) float pixel-unit images (+ Gaussian noise) and int64 labels."""
    images, labels = synthetic_digits(n, seed)
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)
    g = torch.Generator().manual_seed(seed)
    return x + noise * torch.randn(x.shape, generator=g), torch.from_numpy(labels)


def engine_pair(name: str, model_fn: Callable[[], nn.Module], field: str,
                **config) -> list[engines.Engine]:
    """Two engines of method `name` on identical fresh models (same seed), the config's boolean
    `field` True in the first and False in the second."""
    cls = engines.get_engine(name)
    out = []
    for on in (True, False):
        torch.manual_seed(0)
        out.append(cls(model_fn(), torch.zeros(1, 1, 28, 28),
                       cls.config_cls(**{field: on}, **config)))
    return out
