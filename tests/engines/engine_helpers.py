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


class TinyNet(nn.Module):
    """A tiny RGB conv net (3x16x16 in) with BatchNorm ("batch") or GroupNorm ("group") after
    each conv; logits scaled so that a random init already makes confident predictions (the
    entropy filters of EATA/SAR then select samples)."""

    def __init__(self, norm: str = "batch", num_classes: int = 10, scale: float = 25.0):
        super().__init__()
        make = (lambda c: nn.BatchNorm2d(c)) if norm == "batch" else (lambda c: nn.GroupNorm(2, c))
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm1 = make(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.norm2 = make(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, num_classes)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.norm1(self.conv1(x))), 2)
        x = torch.relu(self.norm2(self.conv2(x))).mean((2, 3))
        return self.scale * self.fc2(torch.relu(self.fc1(x)))


# small settings for the tests' speed only (the engines' defaults are the papers')
# memo/cotta: fewer augmentations; ttt: ungated, so the contract sees the adapted model's own
# predictions (TTT's default entropy gate keeps step 0 where an untrained TinyNet's entropy
# does not fall; the gate has its own tests, tests/engines/test_engine_gate.py)
FAST = {"memo": {"n_aug": 4}, "cotta": {"n_aug": 4}, "ttt": {"gate": "none"}}


def rgb_batch(n: int = 8, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    """(n, 3, 16, 16) pixel-unit images; `shift` adds a constant (a covariate shift)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 16, 16, generator=g) * 0.5 + 0.25 + shift).clamp(0, 1)


def make_tiny_engine(name: str, norm: str = "batch", model_seed: int = 0,
                     **config) -> engines.Engine:
    """An engine of method `name` on a fresh TinyNet in eval mode (joint methods attach at
    fc1)."""
    cls = engines.get_engine(name)
    torch.manual_seed(model_seed)
    model = TinyNet(norm).eval()
    base = {"layer": "fc1"} if cls.needs_joint_training else {}
    return cls(model, rgb_batch(2), cls.config_cls(**{**base, **FAST.get(name, {}), **config}))
