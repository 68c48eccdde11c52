"""The model zoo: the seed tutorials' networks, by name, each carrying its normalisation.

Every model takes **pixel-unit** images (N, 1, 28, 28) and returns **logits** (N, C); its first
module normalises, so shards, engines and jobs never normalise by hand.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import TTTPipeError

__all__ = ["Normalize", "SeedCNN", "SeedResCNN", "build_model", "list_models", "register_model"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def deco(cls):
        _MODELS[name] = cls
        return cls

    return deco


def list_models() -> list[str]:
    return sorted(_MODELS)


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a zoo model by name, e.g. `build_model("seed_cnn", mean=0.286, std=0.353)`."""
    try:
        cls = _MODELS[name]
    except KeyError:
        raise TTTPipeError(
            f"unknown model {name!r}; choose from: {', '.join(list_models())}"
        ) from None
    return cls(**kwargs)


class Normalize(nn.Module):
    """(x - mean) / std with fixed scalars (buffers, so they follow `.to(device)`)."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        if not std > 0:
            raise TTTPipeError(f"normalisation std must be > 0, got {std}")
        self.register_buffer("mean", torch.tensor(float(mean)), persistent=False)
        self.register_buffer("std", torch.tensor(float(std)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.item():.4f}, std={self.std.item():.4f}"


class _SeedConvs(nn.Module):
    """What both seed networks share: normalisation, two conv/max-pool blocks, fc1 320→50."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.fc1 = nn.Linear(320, 50)
        self.activation = nn.LeakyReLU()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)                                   # (N, 1, 28, 28)
        x = self.activation(F.max_pool2d(self.conv1(x), 2))     # (N, 10, 12, 12)
        x = self.activation(F.max_pool2d(self.conv2(x), 2))     # (N, 20, 4, 4)
        return self.activation(self.fc1(x.flatten(1)))          # (N, 50)


@register_model("seed_cnn")
class SeedCNN(_SeedConvs):
    """The TTT seed's CNN: two conv/max-pool blocks and three linear layers, LeakyReLU."""

    def __init__(self, mean: float = 0.1307, std: float = 0.3081, num_classes: int = 10):
        super().__init__(mean, std)
        self.fc2 = nn.Linear(50, 50)
        self.fc3 = nn.Linear(50, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation(self.fc2(self.features(x)))
        return self.fc3(x)                                      # logits (N, C)


@register_model("seed_rescnn")
class SeedResCNN(_SeedConvs):
    """The IT3 seed's CNN: the same convs, then fc1 and two residual 50→50 layers, fc4."""

    def __init__(self, mean: float = 0.1307, std: float = 0.3081, num_classes: int = 10):
        super().__init__(mean, std)
        self.fc2 = nn.Linear(50, 50)
        self.fc3 = nn.Linear(50, 50)
        self.fc4 = nn.Linear(50, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.activation(self.fc2(x)) + x
        x = self.activation(self.fc3(x)) + x
        return self.fc4(x)
