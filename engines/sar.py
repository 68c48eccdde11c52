"""SAR (Niu et al., ICLR 2023, "Towards Stable Test-time Adaptation in Dynamic Wild World";
github.com/mr-eggplant/SAR sar.py + sam.py, and mariodoebler/test-time-adaptation
methods/sar.py): reliable entropy minimisation with a sharpness-aware (SAM) step and model
recovery.

A step: forward, entropy of each sample, keep those below E0 = e_margin * ln C; gradient of
their mean entropy; move the weights to w + rho * g / ||g|| (SAM first step); forward again,
keep the first filter's samples whose entropy is still below E0; the gradient there updates w
with the base optimiser (SAM second step). The moving average (0.9 / 0.1) of that second loss
is kept; when it falls below `reset_em` the model collapsed to confident predictions and the
adapted weights (and the optimiser state) go back to where the run started (in online mode:
the start of the online run, i.e. the source weights unless `snapshot()` moved it; episodic:
the batch's start), the average is forgotten. A step with no reliable sample changes nothing
(official SAR steps with a zero/NaN gradient; the momentum it would carry is not applied).

Adapted parameters: the norm affines except the top layers, as the paper does: modules named
`layer4*` (ResNets) and `blocks.9-11` / `norm` (ViT-B), the official `collect_params`. A
generic model without those names adapts every norm layer (`skip` = "" does so everywhere).
Works with BatchNorm (test-batch statistics), GroupNorm and LayerNorm.

Defaults (`SARConfig`): e_margin 0.4 (official `margin_e0 = 0.4 * math.log(1000)`, here
times ln C), rho 0.05 (official SAM rho), reset_em 0.2 (official `reset_constant_em`),
EMA 0.9 (official `update_ema`); base optimiser SGD (momentum 0.9) lr 1e-3, 1 step, online,
batch 200 (Döbler cfgs/cifar10_c/sar.yaml: SAM over SGD, lr 1e-3; the paper's ImageNet
setting is lr 0.00025 at batch 64).
Cost per step: two forward + backward passes of the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from engines.base import _NORM_TYPES, _like, register_engine
from engines.config import TTAConfig
from engines.hooks import DryRun
from engines.tta import TTAEngine, softmax_entropy

__all__ = ["SARConfig", "SAREngine"]

_SKIP = "layer4,blocks.9,blocks.10,blocks.11,norm."  # the official collect_params


@dataclass(frozen=True)
class SARConfig(TTAConfig):
    """SAR. skip: comma-separated name fragments of norm modules not adapted (a module is
    skipped if its name contains one, or equals "norm"); "" adapts every norm layer."""

    optimizer: str = "sgd"
    e_margin: float = 0.4
    rho: float = 0.05
    reset_em: float = 0.2
    skip: str = _SKIP

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.e_margin > 0 and self.rho >= 0 and self.reset_em >= 0):
            raise ValueError("SARConfig: e_margin must be > 0, rho and reset_em >= 0")


@register_engine("sar")
class SAREngine(TTAEngine):
    """Adapted buffers: `method_state.ema` (the moving-average loss; -1 = none yet) and
    `method_state.resets` (how many recoveries happened)."""

    config_cls = SARConfig
    config: SARConfig

    def _build_state(self, probe: DryRun, device: torch.device, dtype: torch.dtype) -> None:
        self.e0 = self.config.e_margin * math.log(self.num_classes)
        self.method_state.register_buffer("ema", torch.full((), -1.0, device=device))
        self.method_state.register_buffer("resets", torch.zeros((), dtype=torch.int64,
                                                                device=device))

    def _select_adapted(self, kind: str, probe: DryRun) -> list[str]:
        names = super()._select_adapted(kind, probe)
        if kind != "norm":
            return names
        parts = [s for s in self.config.skip.split(",") if s]
        skipped = {f"model.{m}." for m, mod in self.model.named_modules()
                   if isinstance(mod, _NORM_TYPES) and parts
                   and (m == "norm" or any(s in m for s in parts))}
        kept = [n for n in names if not any(n.startswith(s) for s in skipped)]
        if not kept:
            raise ValueError(f"SAR skip={self.config.skip!r} leaves no norm layer to adapt in "
                             f"{type(self.model).__name__}; set skip=''")
        return kept

    def _step(self, x: torch.Tensor, params: list[nn.Parameter], opt: torch.optim.Optimizer | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        st = self.method_state
        logits = self.model(x)
        ent = softmax_entropy(logits)
        keep = ent < self.e0
        if not bool(keep.any()):
            return logits, logits.new_zeros(())
        grads = torch.autograd.grad(ent[keep].mean(), params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g)
                                                     for g in grads]))
        old = [p.detach().clone() for p in params]
        with torch.no_grad():                                     # SAM first step
            scale = self.config.rho / (norm + 1e-12)
            for p, g in zip(params, grads):
                p.add_(g * scale)
        ent2 = softmax_entropy(self.model(x))[keep]
        keep2 = ent2 < self.e0
        loss2 = ent2[keep2].mean() if bool(keep2.any()) else None
        grads2 = (torch.autograd.grad(loss2, params, allow_unused=True) if loss2 is not None
                  else [None] * len(params))
        with torch.no_grad():                                     # back to w, then step
            for p, o in zip(params, old):
                p.copy_(o)
        if loss2 is None:
            return logits, logits.new_zeros(())
        for p, g in zip(params, grads2):
            p.grad = _like(g, p)
        opt.step()
        with torch.no_grad():
            value = loss2.detach()
            st.ema.copy_(torch.where(st.ema < 0, value, 0.9 * st.ema + 0.1 * value))
            if bool(st.ema < self.config.reset_em):               # model recovery
                self._recover(opt)
        return logits, loss2.detach()

    def _recover(self, opt: torch.optim.Optimizer) -> None:
        """Adapted parameters back to the run's start, optimiser state cleared, EMA forgotten."""
        start = self._batch_start if self._episodic else self._origin
        n = len(self.adapted_parameters())
        if start is not None:
            for (_, p), s in zip(self.adapted_parameters(), start[:n]):
                p.copy_(s)
        opt.state.clear()
        self.method_state.ema.fill_(-1.0)
        self.method_state.resets += 1
