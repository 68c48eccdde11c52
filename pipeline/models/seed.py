"""The seed tutorials' networks (and a BatchNorm variant), for any C x H x W input (H, W >= 16).

At 1 x 28 x 28 they are exactly the seeds' nets (fc1 320 -> 50, scalar normalisation): the
logits are bit-identical to the original 28x28-only code. Elsewhere fc1's input size follows
`image_size`: 20 * ((H - 4) // 2 - 4) // 2 * ((W - 4) // 2 - 4) // 2 (e.g. 500 at 32 x 32).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import TTTPipeError
from pipeline.models.normalize import Normalize, Stat, check_channels
from pipeline.models.registry import register_model

__all__ = ["SeedCNN", "SeedResCNN", "SeedCNNBN", "seed_feature_size"]

_MNIST_MEAN, _MNIST_STD = 0.1307, 0.3081


def _pair(image_size: int | Sequence[int]) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in size):
        raise TTTPipeError(f"image_size must be an int or (H, W), got {image_size!r}")
    return size  # type: ignore[return-value]


def seed_feature_size(image_size: int | Sequence[int]) -> int:
    """fc1's input size: 20 channels x the spatial size after two conv5 + max-pool2 blocks."""
    h, w = _pair(image_size)
    fh, fw = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
    if fh < 1 or fw < 1:
        raise TTTPipeError(f"the seed nets need images of at least 16x16, got {h}x{w}; "
                           "use --image-size 16 or more")
    return 20 * fh * fw


class _SeedConvs(nn.Module):
    """What the seed networks share: normalisation, two conv/max-pool blocks, fc1 -> 50."""

    def __init__(self, mean: Stat, std: Stat, in_channels: int, image_size, batch_norm: bool = False):
        super().__init__()
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise TTTPipeError(f"in_channels must be a positive integer, got {in_channels!r}")
        self.normalize = Normalize(mean, std)
        check_channels(self.normalize, in_channels, type(self).__name__)
        self.conv1 = nn.Conv2d(in_channels, 10, kernel_size=5)
        if batch_norm:
            self.bn1 = nn.BatchNorm2d(10)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        if batch_norm:
            self.bn2 = nn.BatchNorm2d(20)
        self.fc1 = nn.Linear(seed_feature_size(image_size), 50)
        self.activation = nn.LeakyReLU()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)                                   # (N, C, H, W), e.g. (N, 1, 28, 28)
        x = self.activation(F.max_pool2d(self.conv1(x), 2))     # (N, 10, 12, 12) at 28x28
        x = self.activation(F.max_pool2d(self.conv2(x), 2))     # (N, 20, 4, 4)
        return self.activation(self.fc1(x.flatten(1)))          # (N, 50)


_SEED_KW = ("in_channels", "image_size")


@register_model("seed_cnn", shape_kwargs=_SEED_KW, layers={"ttt": "fc2", "it3": "fc1"},
                inputs="any C x H x W, H, W >= 16")
class SeedCNN(_SeedConvs):
    """The TTT seed's CNN: two conv/max-pool blocks and three linear layers, LeakyReLU."""

    def __init__(self, mean: Stat = _MNIST_MEAN, std: Stat = _MNIST_STD, num_classes: int = 10,
                 in_channels: int = 1, image_size: int | Sequence[int] = (28, 28)):
        super().__init__(mean, std, in_channels, image_size)
        self.fc2 = nn.Linear(50, 50)
        self.fc3 = nn.Linear(50, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation(self.fc2(self.features(x)))
        return self.fc3(x)                                      # logits (N, classes)


@register_model("seed_rescnn", shape_kwargs=_SEED_KW, layers={"ttt": "fc2", "it3": "fc1"},
                inputs="any C x H x W, H, W >= 16")
class SeedResCNN(_SeedConvs):
    """The IT3 seed's CNN: the same convs, then fc1 and two residual 50→50 layers, fc4."""

    def __init__(self, mean: Stat = _MNIST_MEAN, std: Stat = _MNIST_STD, num_classes: int = 10,
                 in_channels: int = 1, image_size: int | Sequence[int] = (28, 28)):
        super().__init__(mean, std, in_channels, image_size)
        self.fc2 = nn.Linear(50, 50)
        self.fc3 = nn.Linear(50, 50)
        self.fc4 = nn.Linear(50, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.activation(self.fc2(x)) + x
        x = self.activation(self.fc3(x)) + x
        return self.fc4(x)


@register_model("seed_cnn_bn", shape_kwargs=_SEED_KW, layers={"ttt": "fc2", "it3": "fc1"},
                inputs="any C x H x W, H, W >= 16")
class SeedCNNBN(_SeedConvs):
    """The TTT seed's CNN with BatchNorm2d after each conv (`bn1`, `bn2`): small enough to train
    here, with normalisation layers for norm-based methods (`adapt_params="norm"`, TENT-like)."""

    def __init__(self, mean: Stat = _MNIST_MEAN, std: Stat = _MNIST_STD, num_classes: int = 10,
                 in_channels: int = 1, image_size: int | Sequence[int] = (28, 28)):
        super().__init__(mean, std, in_channels, image_size, batch_norm=True)
        self.fc2 = nn.Linear(50, 50)
        self.fc3 = nn.Linear(50, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        x = self.activation(F.max_pool2d(self.bn1(self.conv1(x)), 2))
        x = self.activation(F.max_pool2d(self.bn2(self.conv2(x)), 2))
        return self.activation(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation(self.fc2(self.features(x)))
        return self.fc3(x)
