"""CoTTA (Wang et al., CVPR 2022, "Continual Test-Time Domain Adaptation";
github.com/qinenergy/cotta cotta.py, and mariodoebler/test-time-adaptation methods/cotta.py):
a student (the model) learns from an EMA teacher's pseudo-labels; the teacher's prediction is
averaged over `n_aug` augmentations (engines/augment.py) when the source model's mean
confidence on the batch is below `ap`; after each step the teacher moves towards the student
(EMA) and each student weight goes back to its source value with probability `rst`
(stochastic restore). The prediction is the teacher's (official `forward_and_adapt` returns
`outputs_ema`): step k's logits are the teacher prediction at the start of step k, and
`predict()` makes the same prediction from the current state (same augmentation draws), so a
run with K = k ends on step k's logits. Step 0 is not the source model after the first batch
of an online run (the teacher carries state).

State (online: carried from batch to batch until `reset()`): the student's weights, the teacher
(`method_state.teacher__*`, one buffer per model parameter) and the step counter that seeds the
augmentations and the restore masks. `anchor__*` buffers hold the source weights (the restore
target and the confidence check) — taken when the engine is built: build it after loading
the checkpoint into the model, or call `set_source()` after loading.

Defaults (`CoTTAConfig`): EMA 0.999 (official `mt_alpha`, Döbler M_TEACHER.MOMENTUM), rst 0.01
(official CIFAR `rst_m`; ImageNet 0.001), 32 augmentations (official `N = 32`, Döbler
TEST.N_AUGMENTATIONS), ap scaled to the number of classes as the official configs: 0.92 for
C <= 10 (CIFAR-10), 0.72 for C <= 100 (CIFAR-100), 0.1 above (ImageNet); loss: the CE of the
student to the teacher's softmax (official `softmax_entropy` for CIFAR); Adam 1e-3, 1 step,
online, batch 200, every model parameter (Döbler cfgs/cifar10_c/cotta.yaml, official
`configure_model`: all parameters trainable).
Cost per step: student forward + backward, source forward, teacher forward (n_aug + 1 when the
confidence is low); `predict()` the same forwards again without the student.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from engines.base import _like, register_engine
from engines.augment import cotta_augment
from engines.config import TTAConfig
from engines.hooks import DryRun
from engines.tta import TTAEngine

__all__ = ["CoTTAConfig", "CoTTAEngine"]


@dataclass(frozen=True)
class CoTTAConfig(TTAConfig):
    """CoTTA. mt: teacher EMA momentum; rst: stochastic-restore probability; ap: confidence
    threshold for augmentation averaging (-1 = by the number of classes, see the module);
    n_aug: augmentations averaged."""

    adapt_params: str = "model"
    mt: float = 0.999
    rst: float = 0.01
    ap: float = -1.0
    n_aug: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0 <= self.mt <= 1 and 0 <= self.rst <= 1 and self.n_aug >= 1
                and (self.ap == -1 or 0 <= self.ap <= 1)):
            raise ValueError("CoTTAConfig: mt and rst in [0, 1], ap in [0, 1] or -1, "
                             "n_aug >= 1")


def default_ap(num_classes: int) -> float:
    """The official thresholds: CIFAR-10 0.92, CIFAR-100 0.72, ImageNet 0.1."""
    return 0.92 if num_classes <= 10 else 0.72 if num_classes <= 100 else 0.1


@register_engine("cotta")
class CoTTAEngine(TTAEngine):
    """EMA teacher + augmentation-averaged pseudo-labels + stochastic restore."""

    config_cls = CoTTAConfig
    config: CoTTAConfig

    def _build_state(self, probe: DryRun, device: torch.device, dtype: torch.dtype) -> None:
        self.ap = self.config.ap if self.config.ap >= 0 else default_ap(self.num_classes)
        self.anchor = nn.Module()
        self._names = [n for n, _ in self.model.named_parameters()]
        for n, p in self.model.named_parameters():
            key = n.replace(".", "__")
            self.method_state.register_buffer(f"teacher__{key}", p.detach().clone())
            self.anchor.register_buffer(f"anchor__{key}", p.detach().clone())

    def set_source(self) -> None:
        """Teacher and anchor := the model's current weights (e.g. after loading a checkpoint
        into `engine.model`); the step counter restarts."""
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                key = n.replace(".", "__")
                getattr(self.method_state, f"teacher__{key}").copy_(p)
                getattr(self.anchor, f"anchor__{key}").copy_(p)
            self.method_state.step.zero_()
        self._origin = None

    def _weights(self, holder: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
        return {n: getattr(holder, f"{prefix}__{n.replace('.', '__')}") for n in self._names}

    def _teacher(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The teacher's logits for x: averaged over n_aug augmented copies when the source
        model's mean max-probability is below ap (official `anchor_prob.mean(0) < self.ap`)."""
        teacher = self._weights(self.method_state, "teacher")
        anchor = functional_call(self.model, self._weights(self.anchor, "anchor"), (x,))
        if bool(anchor.softmax(1).amax(1).mean() < self.ap):
            views = [functional_call(self.model, teacher, (cotta_augment(x, g),))
                     for _ in range(self.config.n_aug)]
            return torch.stack(views).mean(0)
        return functional_call(self.model, teacher, (x,))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with self._norm(), torch.no_grad():
            return self._teacher(x, self._generator())

    def _step(self, x: torch.Tensor, params: list[nn.Parameter], opt: torch.optim.Optimizer | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        g = self._generator()
        student = self.model(x)
        with torch.no_grad():
            teacher = self._teacher(x, g)
        loss = -(teacher.softmax(1) * student.log_softmax(1)).sum(1).mean()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, gr in zip(params, grads):
            p.grad = _like(gr, p)
        opt.step()
        with torch.no_grad():
            for n, p in self.model.named_parameters():               # teacher EMA
                t = getattr(self.method_state, f"teacher__{n.replace('.', '__')}")
                t.mul_(self.config.mt).add_(p.detach(), alpha=1 - self.config.mt)
            if self.config.rst > 0:                                   # stochastic restore
                src = self._weights(self.anchor, "anchor")
                for name, p in self.adapted_parameters():
                    mask = torch.rand(p.shape, generator=g) < self.config.rst
                    p.copy_(torch.where(mask.to(p.device), src[name[len("model."):]], p))
            self.method_state.step += 1
        return teacher, loss
