"""TTT (Sun et al. 2020): predict the rotation (0/90/180/270 degrees) of each image from a named
layer's features; at test time, descend that rotation loss before predicting.

One forward over the 4B rotated batch gives both the rotation loss and, in its 0-degree quarter,
the main prediction at the same weights — torch-ttt runs the plain batch separately (5B images
per step); here a step costs 4B, and the anytime prediction of step k is that quarter. With
`split_model` the part of the model after the layer runs on that quarter only (the rotated
copies only feed the head), and with `fold_rotations` the part before it runs the four
rotations as rotated kernels on the B images (engines/rotation_fold.py).
With `rotations="rand"` (the official TTT release's `rotate_batch(inputs, 'rand')`) a test-time
step rotates each image once by a random angle: B images with gradients plus a no-grad forward
of the plain B for the anytime prediction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engines.base import Engine, register_engine
from engines.config import TTTConfig
from engines.hooks import DryRun, build_seeded, capture_output
from engines.rotation_fold import rotated_copies
from engines.split import LayerSplit

__all__ = ["TTTEngine", "rotate_batch", "rotation_head"]


def rotate_batch(x: torch.Tensor, labels: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) -> images (4B, C, H, W) = [x, rot90, rot180, rot270] (counter-clockwise,
    as torchvision's `rotate(x, 90)`), labels (4B,) = [0]*B + [1]*B + [2]*B + [3]*B.
    With `labels` (B,) in 0..3: images (B, C, H, W), image i rotated by labels[i] * 90."""
    if labels is not None:  # rotate only the rows that need it
        images = x.clone()
        for k in range(1, 4):
            rows = labels == k
            images[rows] = torch.rot90(x[rows], k, dims=(-2, -1))
        return images, labels
    return rotated_copies(x), _rotation_labels(x)                     # (4B, C, H, W), (4B,)


def _rotation_labels(x: torch.Tensor) -> torch.Tensor:
    """(4B,) = [0]*B + [1]*B + [2]*B + [3]*B: the angles of `rotated_copies(x)`."""
    return torch.arange(4, device=x.device).repeat_interleave(x.shape[0])


def rotation_head(feature_shape: torch.Size) -> nn.Module:
    """torch-ttt's heads: MLP 16-8-4 on (B, C) features; two 3x3 convs + pooling on (B, C, H, W)."""
    if len(feature_shape) == 2:
        c = feature_shape[1]
        return nn.Sequential(nn.Linear(c, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(),
                             nn.Linear(8, 4))
    if len(feature_shape) == 4:
        c, h, w = feature_shape[1:]
        if min(h, w) < 5:
            raise ValueError(f"features {tuple(feature_shape)} are too small for the 3x3 conv "
                             "head (need H, W >= 5); choose an earlier layer")
        return nn.Sequential(nn.Conv2d(c, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3),
                             nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten())
    raise ValueError(f"rotation head needs (B, C) or (B, C, H, W) features, got "
                     f"{tuple(feature_shape)}; choose another layer")


@register_engine("ttt")
class TTTEngine(Engine):
    """Rotation-prediction TTT. `head` is the rotation classifier on `config.layer`'s output.

    Adapted parameters (`adapt_params`): "model" (default, as torch-ttt: every model parameter;
    those after the layer get no gradient), "encoder" (up to the layer), "all" (+ head), "norm".
    `training_loss(x, y=None)` ignores y: (logits of the 0-degree quarter, rotation CE).
    """

    config_cls = TTTConfig
    config: TTTConfig

    def __init__(self, model: nn.Module, example_input: torch.Tensor,
                 config: TTTConfig | dict | None = None):
        if example_input.dim() != 4 or example_input.shape[-1] != example_input.shape[-2]:
            raise ValueError(f"rotation TTT needs square images (B, C, H, H), got "
                             f"{tuple(example_input.shape)}")
        super().__init__(model, example_input, config)

    def _build_aux(self, probe: DryRun, generator: torch.Generator,
                   device: torch.device, dtype: torch.dtype) -> None:
        shape = probe.features.shape
        self.head = build_seeded(lambda: rotation_head(shape), generator, device, dtype)
        self._angles = torch.Generator()  # rotations="rand": re-seeded by every adapt()
        self._split.fold = self.config.fold_rotations and self.config.rotations == "all"

    def _rotation_loss(self, images: torch.Tensor, labels: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(model logits of `images`, CE of the head on the layer's features vs `labels`)."""
        with capture_output(self.model.get_submodule(self.layer_name)) as store:
            logits = self.model(images)
        return logits, F.cross_entropy(self.head(store.output), labels)

    def _rotation_forward(self, x: torch.Tensor, split: LayerSplit | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits of the 0-degree quarter (B, C), rotation loss over all 4B images); with
        `split`, the part after the layer runs on that quarter only (the loss needs just the
        layer's features of all 4B)."""
        if split is None:
            logits, rotation_loss = self._rotation_loss(*rotate_batch(x))  # logits (4B, C)
            return logits[: x.shape[0]], rotation_loss
        cut = split.cut_rotated(x)                                     # cut[0]: the features
        logits = split.run(split.rows(cut, x.shape[0]), None)          # (B, C)
        return logits, F.cross_entropy(self.head(cut[0]), _rotation_labels(x))

    def training_loss(self, x: torch.Tensor, y: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rotation_forward(x)

    def _begin_adapt(self) -> None:
        """With rotations="rand" the angles are drawn from a generator seeded with
        `config.seed` at every `adapt()` call, so a batch's result does not depend on call
        history."""
        self._angles.manual_seed(self.config.seed)

    def _step_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.rotations == "all":
            return self._rotation_forward(x, self._split_for(
                x, rows_check=lambda: (rotated_copies(x[:2]), min(2, x.shape[0]))))
        with torch.no_grad():
            logits = self.model(x)                                     # (B, num_classes)
        labels = torch.randint(4, (x.shape[0],), generator=self._angles).to(x.device)
        return logits, self._rotation_loss(*rotate_batch(x, labels))[1]  # B rotated images
