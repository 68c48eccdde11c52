"""`wrn28_10`: WideResNet-28-10 in RobustBench's layout (robustbench/model_zoo/architectures/
wide_resnet.py, the "Standard" CIFAR models), so a RobustBench state_dict loads without renaming.

Keys: `conv1`, `block{1,2,3}.layer.<i>.{bn1,conv1,bn2,conv2[,convShortcut]}`, `bn1`, `fc`.
RobustBench's models take [0, 1] pixels with no normalisation: the zoo default is
`normalize=none` (the `normalize` module is then the identity map (x - 0) / 1 and holds no
weights). Its `avg_pool2d(out, 8)` is the final map's size at 32x32; here the kernel follows
`image_size` (exactly 8 at 32x32), and `.view(-1, C)` is `.flatten(1)` (same values).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import TTTPipeError
from pipeline.models.normalize import Normalize, Stat, check_channels
from pipeline.models.registry import register_model

__all__ = ["WideResNet", "wrn28_10"]


class BasicBlock(nn.Module):
    """Pre-activation wide block; a 1x1 conv shortcut where the width or stride changes."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (None if self.equal_in_out else
                             nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(pre)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        # RobustBench: the shortcut of a width-changing block starts from the pre-activation.
        return torch.add(x if self.equal_in_out else self.convShortcut(pre), out)


class NetworkBlock(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float):
        super().__init__()
        self.layer = nn.Sequential(*[
            BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
            for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WideResNet(depth, widen_factor) as RobustBench builds it, normalising its input first."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10,
                 mean: Stat = 0.0, std: Stat = 1.0, image_size: int | Sequence[int] = (32, 32),
                 drop_rate: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise TTTPipeError(f"WideResNet depth must be 6N + 4 (e.g. 28), got {depth}")
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if h < 8 or w < 8:
            raise TTTPipeError(f"wrn28_10 takes images of at least 8x8 (32x32 as RobustBench), got {h}x{w}")
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) // 6
        self.normalize = Normalize(mean, std)
        check_channels(self.normalize, 3, "wrn28_10")
        self.conv1 = nn.Conv2d(3, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(channels[3], num_classes)
        self.pool = (math.ceil(math.ceil(h / 2) / 2), math.ceil(math.ceil(w / 2) / 2))
        for m in self.modules():  # RobustBench's (TRADES') init
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, self.pool)
        return self.fc(out.flatten(1))


@register_model("wrn28_10", normalize="none", shape_kwargs=("image_size",),
                layers={"ttt": "block2", "it3": "block1"}, inputs="3x32x32")
def wrn28_10(**kwargs) -> WideResNet:
    """RobustBench's "Standard" WideResNet-28-10 (CIFAR-10/100 layout)."""
    return WideResNet(depth=28, widen_factor=10, **kwargs)
