"""EATA (Niu et al., ICML 2022, "Efficient Test-Time Model Adaptation without Forgetting";
github.com/mr-eggplant/EATA eata.py, and mariodoebler/test-time-adaptation methods/eata.py):
Tent with two sample filters and an anti-forgetting penalty.

- reliability: only samples with entropy < E0 = e_margin * ln C take part (Eqn. 3), each
  weighted by 1 / exp(entropy - E0) (Eqn. 6);
- redundancy: of those, only samples whose softmax has |cosine similarity| < d_margin with the
  moving average of the selected predictions (Eqn. 4-5; average updated 0.9 / 0.1 with each
  step's selected samples);
- Fisher regulariser: + fisher_alpha * sum F_i (theta_i - theta_i^source)^2 (Eqn. 8-9), F the
  mean squared gradient of the CE to the model's own argmax on clean samples — call
  `compute_fisher(batches)` once with clean source data (the official code uses 2000 training
  images); without it EATA is ETA (no penalty), as in the official code.
A step with no selected sample changes nothing (the official `perform_update`).

Defaults (`EATAConfig`): e_margin 0.4 (paper/official `--e_margin math.log(1000)*0.40`, here
times ln C), d_margin 0.05 (official `--d_margin 0.05`), fisher_alpha 2000 (official
`--fisher_alpha 2000.`), moving average 0.9 (official `update_model_probs`); optimiser Adam
1e-3, 1 step, online, batch 200 (Döbler cfgs/cifar10_c/eata.yaml; the ImageNet paper setting
is SGD 0.00025, batch 64). Adapted parameters: the norm affines ("norm").
Cost per step: one forward + backward of the batch (the filtered loss masks, like the
official "implementation version 1"); compute_fisher: one forward + backward per clean batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engines.base import _like, register_engine
from engines.config import TTAConfig
from engines.hooks import DryRun
from engines.tta import TTAEngine, softmax_entropy

__all__ = ["EATAConfig", "EATAEngine"]


@dataclass(frozen=True)
class EATAConfig(TTAConfig):
    """EATA. e_margin: E0 / ln C; d_margin: cosine-similarity threshold of the redundancy
    filter; fisher_alpha: weight of the Fisher penalty (used once `compute_fisher` ran)."""

    e_margin: float = 0.4
    d_margin: float = 0.05
    fisher_alpha: float = 2000.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.e_margin > 0 and self.d_margin > 0 and self.fisher_alpha >= 0):
            raise ValueError("EATAConfig: e_margin and d_margin must be > 0, fisher_alpha >= 0")


@register_engine("eata")
class EATAEngine(TTAEngine):
    """Adapted buffers: `method_state.probs` (C,) the moving-average prediction and
    `method_state.has_probs`; `fisher.*` (the Fisher information and source weights of each
    adapted parameter) are set by `compute_fisher` and never change during adaptation."""

    config_cls = EATAConfig
    config: EATAConfig

    def _build_state(self, probe: DryRun, device: torch.device, dtype: torch.dtype) -> None:
        self.e0 = self.config.e_margin * math.log(self.num_classes)
        self.method_state.register_buffer("probs", torch.zeros(self.num_classes, device=device,
                                                               dtype=dtype))
        self.method_state.register_buffer("has_probs", torch.zeros((), dtype=torch.bool,
                                                                   device=device))
        self.fisher = nn.Module()

    def compute_fisher(self, batches: Iterable[torch.Tensor]) -> int:
        """The Fisher information of the adapted parameters from clean images (each a (B, C,
        H, W) pixel-unit tensor): the mean over batches of the squared gradient of CE(logits,
        argmax logits), BatchNorm on batch statistics as during adaptation (official EATA).
        Stores it with the current weights as the penalty's anchor; returns the batch count."""
        named = self.adapted_parameters()
        sums = [torch.zeros_like(p) for _, p in named]
        n = 0
        with torch.inference_mode(False), torch.enable_grad(), self._norm():
            for x in batches:
                logits = self.model(x.to(named[0][1].device) if named else x)
                loss = F.cross_entropy(logits, logits.argmax(1))
                grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
                for s, g in zip(sums, grads):
                    if g is not None:
                        s.add_(g.detach() ** 2)
                n += 1
        if n == 0:
            raise ValueError("compute_fisher got no batch; pass clean images, e.g. 2000 "
                             "training images in batches")
        for (name, p), s in zip(named, sums):
            key = name.replace(".", "__")
            self.fisher.register_buffer(f"{key}__fisher", s / n)
            self.fisher.register_buffer(f"{key}__anchor", p.detach().clone())
        return n

    def _penalty(self) -> torch.Tensor | float:
        if not len(self.fisher._buffers) or self.config.fisher_alpha == 0:
            return 0.0
        total = 0.0
        for name, p in self.adapted_parameters():
            key = name.replace(".", "__")
            fisher = getattr(self.fisher, f"{key}__fisher")
            anchor = getattr(self.fisher, f"{key}__anchor")
            total = total + (fisher * (p - anchor) ** 2).sum()
        return self.config.fisher_alpha * total

    def _step(self, x: torch.Tensor, params: list[nn.Parameter], opt: torch.optim.Optimizer | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        st = self.method_state
        logits = self.model(x)
        ent = softmax_entropy(logits)
        keep = ent < self.e0                                          # reliable (Eqn. 3)
        probs = logits.detach().softmax(1)
        if bool(st.has_probs):                                        # non-redundant (Eqn. 5)
            cos = F.cosine_similarity(st.probs[None], probs, dim=1)
            keep = keep & (cos.abs() < self.config.d_margin)
        with torch.no_grad():                                         # Eqn. 4
            if keep.any():
                mean = probs[keep].mean(0)
                st.probs.copy_(0.9 * st.probs + 0.1 * mean if bool(st.has_probs) else mean)
                st.has_probs.fill_(True)
        coeff = torch.exp(-(ent.detach() - self.e0))                  # 1 / exp(E - E0)
        count = keep.sum()
        loss = (ent * coeff * keep).sum() / count.clamp(min=1) + self._penalty()
        if bool(count > 0):  # the official perform_update: no selected sample, no step
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for p, g in zip(params, grads):
                p.grad = _like(g, p)
            opt.step()
        return logits, loss.detach() if torch.is_tensor(loss) else logits.new_tensor(loss)
