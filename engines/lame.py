"""LAME (Boudiaf et al., CVPR 2022, "Parameter-free Online Test-time Adaptation";
github.com/fiveai/LAME, and mariodoebler/test-time-adaptation methods/lame.py): no parameter
changes; the batch's output probabilities are adjusted by Laplacian-regularised maximum
likelihood — Y = argmin sum_i KL(y_i || p_i) - lambda sum_ij W_ij y_i^T y_j — solved by the
bound-optimisation fixed point y_i <- softmax(log p_i + lambda sum_j W_ij y_j) on a kNN
affinity W of the L2-normalised features. Strong on label-correlated (non-i.i.d.) streams.

Features: the input of the last `nn.Linear` (the classifier's, as the official
`split_up_model`), or with `layer` set, that module's output flattened.
A step = up to `max_iters` fixed-point iterations, stopping when the energy changes by
<= 1e-8 relative (official `laplacian_optimization`); step k continues from step k-1's Y, so
K steps = K * max_iters iterations and step 0 is the source prediction; the recorded
"loss" is the mean KL(Y || p). The logits returned are
log Y (softmax(log Y) = Y). With zero affinity (knn=0) Y = p: the argmax is unchanged.

Defaults (`LAMEConfig`): affinity "knn" with knn 5 (the paper's kNN affinity; Döbler
conf.py LAME.KNN 5), lambda 1 and 100 iterations (official `bound_lambda=1, max_steps=100`),
force_symmetry False (Döbler LAME.FORCE_SYMMETRY); "rbf" uses sigma = the mean kNN distance
as the official rbf_affinity. BatchNorm keeps the source statistics (bn_prior 1: the official
model is in eval mode). Adapted parameters: none; LAME is stateless across batches.
Cost per step: one forward of the batch + O(B^2) affinity, negligible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engines.base import register_engine
from engines.config import TTAConfig
from engines.hooks import DryRun, capture_output, find_module
from engines.tta import TTAEngine

__all__ = ["LAMEConfig", "LAMEEngine", "laplacian_adjust"]


@dataclass(frozen=True)
class LAMEConfig(TTAConfig):
    """LAME. affinity: "knn" | "rbf" | "linear"; knn: neighbours (0 = no affinity); lam: the
    Laplacian weight; max_iters: fixed-point iterations per step; force_symmetry: W <- (W+W^T)/2."""

    adapt_params: str = "none"
    bn_prior: float = 1.0
    affinity: str = "knn"
    knn: int = 5
    lam: float = 1.0
    max_iters: int = 100
    force_symmetry: bool = False

    choices = {**TTAConfig.choices, "affinity": ("knn", "linear", "rbf")}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adapt_params != "none":
            raise ValueError(f"lame changes no parameter; adapt_params must be 'none', "
                             f"got {self.adapt_params!r}")
        if self.knn < 0 or self.max_iters < 1 or self.lam < 0:
            raise ValueError("LAMEConfig: knn >= 0, max_iters >= 1, lam >= 0")


def affinity(features: torch.Tensor, kind: str, knn: int) -> torch.Tensor:
    """(N, N) affinity of L2-normalised features (N, d), as the official kNN/rbf/linear."""
    n = features.shape[0]
    if kind == "linear":
        return features @ features.T
    dist = torch.cdist(features, features)                          # (N, N)
    if kind == "rbf":
        k = min(knn, n)
        if k == 0:
            return torch.zeros_like(dist)
        sigma = dist.topk(k, -1, largest=False).values[:, -1].mean()
        return torch.exp(-dist ** 2 / (2 * sigma ** 2))
    w = torch.zeros_like(dist)
    k = min(knn + 1, n)
    if k > 1:
        index = dist.topk(k, -1, largest=False).indices[:, 1:]     # (N, knn), not itself
        w.scatter_(1, index, 1.0)
    return w


def laplacian_adjust(y: torch.Tensor, unary: torch.Tensor, kernel: torch.Tensor, lam: float,
                     iters: int) -> torch.Tensor:
    """Up to `iters` fixed-point iterations from the assignment Y (N, K), official stopping."""
    old = float("inf")
    for i in range(iters):
        pairwise = lam * kernel @ y
        y = (-unary + pairwise).softmax(-1)
        energy = float((unary * y - lam * pairwise * y + y * y.clamp(min=1e-20).log()).sum())
        if i > 1 and abs(energy - old) <= 1e-8 * abs(old):
            break
        old = energy
    return y


@register_engine("lame")
class LAMEEngine(TTAEngine):
    """Laplacian-adjusted output probabilities. Adapted parameters and buffers: none."""

    config_cls = LAMEConfig
    config: LAMEConfig

    def _build_state(self, probe: DryRun, device: torch.device, dtype: torch.dtype) -> None:
        if self.config.layer:
            self._feature_module = find_module(self.model, self.config.layer)
            self._feature_input = False
        else:
            linears = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ValueError(f"lame needs features: {type(self.model).__name__} has no "
                                 f"nn.Linear classifier; set layer to the feature module")
            self._feature_module, self._feature_input = linears[-1], True
        self._y: torch.Tensor | None = None

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen: list[torch.Tensor] = []

        def hook(_m, inputs, output):
            seen.append(inputs[0] if self._feature_input else output)

        handle = self._feature_module.register_forward_hook(hook)
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        return logits, seen[-1].flatten(1)

    def _begin(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            logits, feats = self._features(x)
            self._unary = -torch.log(logits.softmax(1) + 1e-10)     # official unary
            kernel = affinity(F.normalize(feats, dim=-1), self.config.affinity, self.config.knn)
            if self.config.force_symmetry:
                kernel = (kernel + kernel.T) / 2
            self._kernel = kernel
            self._y = (-self._unary).softmax(-1)
            self._logits0 = logits

    def adapt(self, x, steps=None, lr=None, *, mode=None, optimizer=None):
        """`Engine.adapt`: Y starts from the source prediction of this batch."""
        self._y = None
        try:
            return super().adapt(x, steps, lr, mode=mode, optimizer=optimizer)
        finally:
            self._y = None

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        if self._y is None:
            return super().predict(x)
        return self._y.clamp(min=1e-20).log()

    def _step(self, x: torch.Tensor, params: list[nn.Parameter], opt: torch.optim.Optimizer | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            if self._y is None:
                self._begin(x)
                before = self._logits0                              # the source prediction
            else:
                before = self.predict(x)
            self._y = laplacian_adjust(self._y, self._unary, self._kernel, self.config.lam,
                                       self.config.max_iters)
            kl = (self._y * (self._y.clamp(min=1e-20).log() + self._unary)).sum(1).mean()
        return before, kl  # the loss recorded: mean KL(Y || p), the unary term
