"""Tent (Wang et al., ICLR 2021, "Tent: Fully Test-time Adaptation by Entropy Minimization";
github.com/DequanWang/tent, and mariodoebler/test-time-adaptation methods/tent.py): minimise the
mean prediction entropy over the affine parameters of the normalisation layers, with
BatchNorm on the test batch's statistics — in eval mode too (the official `configure_model`
sets track_running_stats=False and drops the running statistics; torch-ttt's Tent keeps the
source statistics in eval mode, which is not Tent).

Defaults (`TentConfig`, from TTAConfig): Adam lr 1e-3 (betas 0.9/0.999, no weight decay),
1 step per batch, online, batch 200: DequanWang/tent cfgs/tent.yaml for CIFAR-10-C (Adam
1e-3, batch 128, STEPS 1, EPISODIC False) and the Döbler cfgs/cifar10_c/tent.yaml (batch
200). For ImageNet the paper uses SGD lr 0.00025 (batch 64, momentum 0.9): pass
optimizer="sgd", lr=0.00025.
Adapted parameters: weight and bias of every BatchNorm/GroupNorm/LayerNorm ("norm").
Cost per step: one forward + backward of the batch; the last prediction one more forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engines.base import register_engine
from engines.config import TTAConfig
from engines.tta import TTAEngine, softmax_entropy

__all__ = ["TentConfig", "TentEngine"]


@dataclass(frozen=True)
class TentConfig(TTAConfig):
    """Tent: the TTAConfig defaults are Tent's (see the module docstring)."""


@register_engine("tent")
class TentEngine(TTAEngine):
    """Entropy minimisation of the norm affine parameters (test-batch BN statistics)."""

    config_cls = TentConfig
    config: TentConfig

    def _step_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, softmax_entropy(logits).mean()
