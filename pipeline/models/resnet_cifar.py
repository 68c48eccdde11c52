"""`resnet26`: the TTT paper's ResNetCifar (Sun et al. 2020, github.com/yueatsprograms/ttt_cifar_release,
models/ResNet.py), depth 26 = 6N + 2 with N = 4 pre-activation blocks per stage, width 1.

Same layout and parameter names as the release (`conv1`, `layer1..3.<i>.{bn1,conv1,bn2,conv2}`,
`bn`, `fc`), so its state_dicts load as they are. `norm="group"` is GroupNorm(8, C) — the paper's
choice for small test batches (`--group_norm 8`) — and `norm="batch"` BatchNorm2d. The release's
shortcut is parameter-free: average-pool by the stride, then pad channels with zeros. Its
`AvgPool2d(8)` is the final map's size at 32x32 (here computed from `image_size`, so other sizes
divisible by 4 work too; at 32x32 it is exactly 8), and `.view` is `.flatten(1)` (same values,
and it runs on channels_last activations).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from pipeline.errors import TTTPipeError
from pipeline.models.normalize import Normalize, Stat, check_channels
from pipeline.models.registry import register_model

__all__ = ["ResNetCifar", "resnet26"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # the class defaults; model_kwargs_for passes the dataset's
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _norm_layer(norm: str):
    if norm == "group":
        return lambda planes: nn.GroupNorm(8, planes)
    if norm == "batch":
        return nn.BatchNorm2d
    raise TTTPipeError(f"unknown norm {norm!r} for resnet26; choose from: group, batch")


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Pre-activation block: x + conv2(relu(norm(conv1(relu(norm(x)))))), shortcut downsampled."""

    def __init__(self, inplanes: int, planes: int, norm_layer, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.downsample = downsample
        self.stride = stride
        self.bn1 = norm_layer(inplanes)
        self.relu1 = nn.ReLU()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.conv1(self.relu1(self.bn1(x)))
        residual = self.conv2(self.relu2(self.bn2(residual)))
        if self.downsample is not None:
            x = self.downsample(x)
        return x + residual


class Downsample(nn.Module):
    """Average-pool by `stride`, then zero channels up to `n_out` (no parameters)."""

    def __init__(self, n_in: int, n_out: int, stride: int):
        super().__init__()
        self.avg = nn.AvgPool2d(stride)
        self.expand_ratio = n_out // n_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avg(x)
        return torch.cat([x] + [x.mul(0)] * (self.expand_ratio - 1), 1)


class ResNetCifar(nn.Module):
    """ResNetCifar(depth, width) for CIFAR-sized images, normalising its pixel-unit input."""

    def __init__(self, depth: int = 26, width: int = 1, num_classes: int = 10, norm: str = "group",
                 mean: Stat = CIFAR10_MEAN, std: Stat = CIFAR10_STD, in_channels: int = 3,
                 image_size: int | Sequence[int] = (32, 32)):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise TTTPipeError(f"ResNetCifar depth must be 6N + 2 (e.g. 26), got {depth}")
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if h < 8 or w < 8 or h % 4 or w % 4:
            raise TTTPipeError(f"resnet26 takes images whose sides are multiples of 4 (32x32 as in the "
                               f"paper), got {h}x{w}; pass --image-size 32")
        norm_layer = _norm_layer(norm)
        self.blocks_per_stage = (depth - 2) // 6
        self.normalize = Normalize(mean, std)
        check_channels(self.normalize, in_channels, "resnet26")
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.inplanes = 16
        self.layer1 = self._make_layer(norm_layer, 16 * width)
        self.layer2 = self._make_layer(norm_layer, 32 * width, stride=2)
        self.layer3 = self._make_layer(norm_layer, 64 * width, stride=2)
        self.bn = norm_layer(64 * width)
        self.relu = nn.ReLU()
        self.avgpool = nn.AvgPool2d((h // 4, w // 4))
        self.fc = nn.Linear(64 * width, num_classes)
        for m in self.modules():  # the release's init: He-normal convs (fan-out)
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / n))

    def _make_layer(self, norm_layer, planes: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = Downsample(self.inplanes, planes, stride)
        layers = [BasicBlock(self.inplanes, planes, norm_layer, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes, norm_layer) for _ in range(self.blocks_per_stage - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.normalize(x))   # (N, 16, H, W)
        x = self.layer1(x)                  # (N, 16, H, W)
        x = self.layer2(x)                  # (N, 32, H/2, W/2)
        x = self.layer3(x)                  # (N, 64, H/4, W/4)
        x = self.avgpool(self.relu(self.bn(x)))
        return self.fc(x.flatten(1))        # logits (N, classes)


@register_model("resnet26", shape_kwargs=("in_channels", "image_size"),
                layers={"ttt": "layer2", "it3": "layer1"}, inputs="32x32 (sides multiples of 4)")
def resnet26(norm: str = "group", **kwargs) -> ResNetCifar:
    """The TTT paper's ResNet-26 (width 1); `norm` group (GroupNorm(8), default) or batch."""
    return ResNetCifar(depth=26, width=1, norm=norm, **kwargs)
