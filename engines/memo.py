"""MEMO (Zhang, Levine & Finn, NeurIPS 2022, "MEMO: Test Time Robustness via Adaptation and
Augmentation"; github.com/zhangmarvin/memo, and mariodoebler/test-time-adaptation
methods/memo.py): for each test sample on its own, minimise the entropy of the marginal
prediction over `n_aug` AugMix views of it (engines/augment.py), then predict the sample.

Episodic per sample by default (the paper): every sample of a batch starts from the weights
the batch started with; online mode carries the weights from sample to sample (in batch order).
BatchNorm: as the official ImageNet code, every BatchNorm normalises with the source statistics
mixed with those of the current input by the prior N/(N+1), N = 16 (`--prior_strength 16`,
`_modified_bn_forward`), both for the augmented views and for the single-image prediction —
so BN models work on one sample (bn_prior 0 would use the statistics of the 32 views alone and
fail on the single-image prediction of a model with BatchNorm1d).

Defaults (`MEMOConfig`): 32 views (official CIFAR `--batch_size 32`; ImageNet uses 64), 1 step
(`--niter 1`) of SGD lr 0.005 (official CIFAR-10 ResNet-26 and Döbler cfgs/cifar10_c/memo.yaml;
ImageNet 0.00025), every model parameter ("model", the official `optim.SGD(net.parameters())`),
AugMix severity 3. The official SGD has no momentum; here SGD has momentum 0.9, which only
matters for steps > 1. Adapted buffers: the step counter (seeds the views).
Cost per step and sample: a forward + backward of n_aug views + one forward of the sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engines.base import AdaptResult, register_engine
from engines.augment import augmix
from engines.config import TTAConfig
from engines.tta import TTAEngine

__all__ = ["MEMOConfig", "MEMOEngine", "marginal_entropy"]


@dataclass(frozen=True)
class MEMOConfig(TTAConfig):
    """MEMO. n_aug: AugMix views per sample and step; severity: AugMix strength (1..10)."""

    adapt_params: str = "model"
    optimizer: str = "sgd"
    lr: float = 0.005
    mode: str = "episodic"
    batch_size: int = 32
    bn_prior: float = 16 / 17
    n_aug: int = 32
    severity: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_aug < 1 or not 0 < self.severity <= 10:
            raise ValueError("MEMOConfig: n_aug must be >= 1 and severity in (0, 10]")


def marginal_entropy(outputs: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean softmax over the views (N, C), computed in log space (official)."""
    logp = outputs - outputs.logsumexp(-1, keepdim=True)
    avg = logp.logsumexp(0) - math.log(outputs.shape[0])
    avg = avg.clamp(min=torch.finfo(avg.dtype).min)
    return -(avg * avg.exp()).sum(-1)


@register_engine("memo")
class MEMOEngine(TTAEngine):
    """Marginal entropy over augmentations of each single sample."""

    config_cls = MEMOConfig
    config: MEMOConfig

    def adapt(self, x: torch.Tensor, steps: int | None = None, lr: float | None = None, *,
              mode: str | None = None, optimizer: str | None = None) -> AdaptResult:
        """`Engine.adapt` per sample: logits (K+1, B, C), losses (K,) the mean over samples."""
        if x.dim() != 4:
            raise ValueError(f"memo needs images (B, C, H, W), got {tuple(x.shape)}")
        runs = [super(MEMOEngine, self).adapt(x[i:i + 1], steps, lr, mode=mode,
                                              optimizer=optimizer) for i in range(len(x))]
        return AdaptResult(logits=torch.cat([r.logits for r in runs], 1),
                           losses=torch.stack([r.losses for r in runs]).mean(0))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Each sample on its own (BatchNorm mixes its own statistics with the prior)."""
        return torch.cat([super(MEMOEngine, self).predict(x[i:i + 1]) for i in range(len(x))])

    def _step_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            logits = self.model(x)                                     # (1, C)
        g = self._generator()
        views = torch.stack([augmix(x[0], g, self.config.severity)
                             for _ in range(self.config.n_aug)])      # (n_aug, C, H, W)
        with torch.no_grad():
            self.method_state.step += 1
        return logits, marginal_entropy(self.model(views))
