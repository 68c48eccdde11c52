"""What the fully test-time methods share: no auxiliary part (any source model), BatchNorm with
test-batch statistics in train and eval mode alike, the method's own state as buffers, entropy,
and per-step seeded random draws.

State a method carries between batches (a teacher, a moving average, a step counter) lives in
buffers of `self.method_state`: `adapt()` snapshots and restores every buffer, so episodic
restore, online carry-over and `reset()` cover it with no extra code and no deepcopy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from engines.base import AdaptResult, Engine
from engines.config import TTAConfig
from engines.hooks import DryRun

__all__ = ["TTAEngine", "batch_statistics", "softmax_entropy"]

_BN = nn.modules.batchnorm._BatchNorm


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(B,) entropy of softmax(logits) in nats: -(p * log p).sum(1) (Tent's `softmax_entropy`)."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def _bn_forward(m: nn.modules.batchnorm._BatchNorm, prior: float):
    dims: list[int] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        single = x.numel() == x.shape[1] and m.running_mean is not None  # 1 value per channel
        if (prior == 0.0 and not single) or m.running_mean is None:  # the test batch (Tent)
            return F.batch_norm(x, None, None, m.weight, m.bias, True, 0.0, m.eps)
        if prior == 1.0 or single:                  # the source statistics
            return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False,
                                0.0, m.eps)
        dims[:] = [0, *range(2, x.dim())]
        with torch.no_grad():  # as robusta's / MEMO's _modified_bn_forward: no gradient
            mean = x.mean(dims)                     # through the mixed statistics
            var = x.var(dims, unbiased=True)        # (momentum-1 batch_norm stores unbiased)
        mean = prior * m.running_mean + (1 - prior) * mean
        var = prior * m.running_var + (1 - prior) * var
        return F.batch_norm(x, mean, var, m.weight, m.bias, False, 0.0, m.eps)
    return forward


@contextmanager
def batch_statistics(model: nn.Module, prior: float = 0.0) -> Iterator[None]:
    """Inside the block every BatchNorm of `model` normalises with (1 - prior) * the batch's
    + prior * the running statistics, in train and eval mode alike, and never updates its
    running statistics; a layer that sees one value per channel (BatchNorm1d on one sample)
    uses its running statistics. Re-entrant; the modules' own `forward` is back on exit."""
    patched = []
    for m in model.modules():
        if isinstance(m, _BN) and "forward" not in m.__dict__:
            m.forward = _bn_forward(m, prior)
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


class TTAEngine(Engine):
    """Base of the methods without an auxiliary part. `adapt()` and `predict()` run the model
    with BatchNorm on test-batch statistics (`config.bn_prior`); `adapted_buffers()` is the
    method's state (`method_state.*`). Joint training does not exist: train a plain source
    model (`ttt-pipe train --method source`)."""

    needs_joint_training: ClassVar[bool] = False
    config_cls: ClassVar[type[TTAConfig]] = TTAConfig
    config: TTAConfig

    def _no_update_step(self, x: torch.Tensor, params: list[nn.Parameter],
                        opt: torch.optim.Optimizer | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A step that changes nothing (norm, source): the logits and their mean entropy."""
        with torch.no_grad():
            logits = self.model(x)
        return logits, softmax_entropy(logits).mean()

    def _build_aux(self, probe: DryRun, generator: torch.Generator,
                   device: torch.device, dtype: torch.dtype) -> None:
        self.num_classes = int(probe.logits.shape[1])
        self.method_state = nn.Module()
        self.method_state.register_buffer("step", torch.zeros((), dtype=torch.int64,
                                                              device=device))
        self._build_state(probe, device, dtype)

    def _build_state(self, probe: DryRun, device: torch.device, dtype: torch.dtype) -> None:
        """Register the method's state buffers on `self.method_state`."""

    def adapted_buffers(self) -> list[tuple[str, torch.Tensor]]:
        return [(f"method_state.{n}", b) for n, b in self.method_state.named_buffers()]

    def training_loss(self, x: torch.Tensor, y: torch.Tensor | None = None) -> Any:
        raise ValueError(f"{self.name} has no auxiliary part to train; train the model alone "
                         f"(ttt-pipe train --method source) and adapt it with --method "
                         f"{self.name}")

    def set_source(self) -> None:
        """Re-read what the method keeps of the source model (CoTTA's teacher and anchor) from
        `self.model`: call it after loading weights into the model of a built engine."""

    def _norm(self):
        return batch_statistics(self.model, self.config.bn_prior)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with self._norm():
            return self.model(x)

    def adapt(self, x: torch.Tensor, steps: int | None = None, lr: float | None = None, *,
              mode: str | None = None, optimizer: str | None = None) -> AdaptResult:
        self._episodic = (mode or self.config.mode) == "episodic"
        with self._norm():
            return super().adapt(x, steps, lr, mode=mode, optimizer=optimizer)

    def adapt_episodes(self, xs: torch.Tensor, steps: int | None = None,
                       lr: float | None = None, *, optimizer: str | None = None
                       ) -> AdaptResult:
        """G episodic problems xs (G, B, ...): logits (K+1, G, B, C), losses (K, G), the API of
        `Engine.adapt_episodes` (engines/batched.py), run one by one — these methods' steps
        (test-batch BN statistics, filters, teachers, own `_step`) are not vmapped."""
        runs = [self.adapt(x, steps, lr, mode="episodic", optimizer=optimizer) for x in xs]
        return AdaptResult(logits=torch.stack([r.logits for r in runs], 1),
                           losses=torch.stack([r.losses for r in runs], 1))

    def _generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator for the current step's random draws, seeded with (config.seed, the
        step count in `method_state.step` + offset): a batch's draws depend on the seed and on
        how many steps the state has seen, so episodic batches, anytime re-runs and resumed
        online runs draw the same numbers."""
        step = int(self.method_state.step) + offset
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """torch-ttt facade: adapts in train and eval mode alike (there is nothing to train)."""
        training = self.training
        self.training = False
        try:
            return super().forward(x, target)
        finally:
            self.training = training
