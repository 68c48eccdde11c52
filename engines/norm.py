"""BN-adapt (Schneider et al. 2020, "Improving robustness against common corruptions by covariate
shift adaptation"; Nado et al. 2020 "prediction-time BN"): normalise every BatchNorm with the
test batch's statistics instead of the source's. No parameter changes, no gradient.

Defaults (`NormConfig`): bn_prior 0 — pure test-batch statistics, the "BN-1"/`norm_test`
setting of mariodoebler/test-time-adaptation (cfgs/cifar10_c/norm_test.yaml, batch 200) and
of the Tent README's BN row (CIFAR-10-C, 20.4 % error). `bn_prior` = N / (N + n) mixes in
the source statistics as Schneider et al.'s prior of strength N for batches of n
(the Döbler `norm_alpha` setting is bn_prior 0.9, i.e. BN.ALPHA 0.1, for batch 1).

Anytime: the statistics are those of the batch itself, so every step's prediction is the
same; K steps are honoured (K+1 identical logits; the "loss" of a step is the mean entropy of
its prediction, for the record). Step 0 is already adapted — compare with a `source` run.
Online mode carries nothing (the method is stateless); `reset()` is a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass


from engines.base import register_engine
from engines.config import TTAConfig
from engines.tta import TTAEngine

__all__ = ["NormConfig", "NormEngine"]


@dataclass(frozen=True)
class NormConfig(TTAConfig):
    """BN-adapt. adapt_params must stay "none" (the method changes no parameter)."""

    adapt_params: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adapt_params != "none":
            raise ValueError(f"norm changes no parameter; adapt_params must be 'none', "
                             f"got {self.adapt_params!r} (use tent to train the BN affines)")


@register_engine("norm")
class NormEngine(TTAEngine):
    """Test-batch BatchNorm statistics. Adapted parameters: none; adapted buffers: none
    change (the step counter stays 0). On a model without BatchNorm it is the source model."""

    config_cls = NormConfig
    config: NormConfig

    _step = TTAEngine._no_update_step
