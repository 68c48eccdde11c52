"""`resnet18`, `resnet50`: torchvision's ImageNet ResNets (`torchvision.models.ResNet`, built with
`weights=None`: never downloaded; weights come from the user's file via `ttt-pipe import-model`).

A subclass of torchvision's class with a `normalize` module in front: the state_dict keys are
exactly torchvision's (`conv1`, `bn1`, `layer1..4`, `fc`; the normalisation buffers are not
weights), so `torchvision.models.resnet50(weights=...).state_dict()` loads as it is. The zoo
default is `normalize=imagenet`, the statistics torchvision's weights were trained with.
Any input size works (adaptive average pooling); 224x224 is what the weights are made for.
"""

from __future__ import annotations

import functools

from pipeline.models.kwargs import IMAGENET_MEAN, IMAGENET_STD
from pipeline.models.normalize import Normalize, Stat, check_channels
from pipeline.models.registry import register_model

__all__ = ["normalized_resnet_class", "resnet18", "resnet50"]


@functools.cache
def normalized_resnet_class():
    """`NormalizedResNet`, a subclass of torchvision's ResNet (torchvision is imported only when
    a ResNet is built: it takes seconds, and most runs never need it)."""
    from torchvision.models.resnet import ResNet

    class NormalizedResNet(ResNet):
        """torchvision's ResNet taking pixel-unit images: `normalize`, then torchvision's forward."""

        def __init__(self, block, layers: list[int], num_classes: int = 1000,
                     mean: Stat = IMAGENET_MEAN, std: Stat = IMAGENET_STD, **kwargs):
            super().__init__(block, layers, num_classes=num_classes, **kwargs)
            self.normalize = Normalize(mean, std)
            check_channels(self.normalize, 3, "resnet")

        def forward(self, x):
            return self._forward_impl(self.normalize(x))

    return NormalizedResNet


_LAYERS = {"ttt": "layer2", "it3": "layer1"}


@register_model("resnet18", normalize="imagenet", layers=_LAYERS, inputs="3x224x224 (any size)")
def resnet18(**kwargs):
    """torchvision's resnet18 (BasicBlock, [2, 2, 2, 2])."""
    from torchvision.models.resnet import BasicBlock

    return normalized_resnet_class()(BasicBlock, [2, 2, 2, 2], **kwargs)


@register_model("resnet50", normalize="imagenet", layers=_LAYERS, inputs="3x224x224 (any size)")
def resnet50(**kwargs):
    """torchvision's resnet50 (Bottleneck, [3, 4, 6, 3])."""
    from torchvision.models.resnet import Bottleneck

    return normalized_resnet_class()(Bottleneck, [3, 4, 6, 3], **kwargs)
