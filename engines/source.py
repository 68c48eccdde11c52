"""The unadapted source model as an engine ("source"): the baseline every method is measured
against, run through the same loop (same batches, same anytime rows, same files).

BatchNorm keeps the source (running) statistics whatever the train/eval flag (bn_prior 1);
no parameter or buffer changes; every step's prediction is the source prediction (K steps are
honoured: K+1 identical logits; the recorded "loss" is the mean entropy).
"""

from __future__ import annotations

from dataclasses import dataclass


from engines.base import register_engine
from engines.config import TTAConfig
from engines.tta import TTAEngine

__all__ = ["SourceConfig", "SourceEngine"]


@dataclass(frozen=True)
class SourceConfig(TTAConfig):
    """No adaptation: adapt_params "none", bn_prior 1, steps 0."""

    adapt_params: str = "none"
    bn_prior: float = 1.0
    steps: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adapt_params != "none" or self.bn_prior != 1.0:
            raise ValueError("source adapts nothing: adapt_params must be 'none' and "
                             "bn_prior 1 (use norm or tent to adapt)")


@register_engine("source")
class SourceEngine(TTAEngine):
    """The model as trained. Adapted parameters and buffers: none."""

    config_cls = SourceConfig
    config: SourceConfig

    _step = TTAEngine._no_update_step
