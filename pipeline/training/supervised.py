"""Plain supervised training (`ttt-pipe train --method source`): the model alone, no auxiliary part.

The trainer drives an "engine" through `joint_loss(x, y) -> (loss, logits, aux_loss)`,
`predict(x)`, `train()`/`eval()`, `parameters()` and `state_dict()` (pipeline/training/loop.py).
`Supervised` gives the bare model that interface — loss = cross-entropy, aux loss 0 — so a
source model trains through the same loop (optimizer, schedule, augmentation, precision,
validation, resume) as a joint one. The checkpoint stores the MODEL's state_dict (a `source`
checkpoint, as `ttt-pipe import-model` writes), which every method without joint training
adapts (`ttt-pipe adapt --method norm|tent|...`, pipeline/methods.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Supervised", "trainable_engine", "checkpoint_weights", "trains_model_alone"]

SOURCE = "source"  # pipeline.checkpoint.SOURCE_METHOD


class Supervised(nn.Module):
    """The model as the trainer's engine: cross-entropy only (aux loss 0)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def joint_loss(self, x: torch.Tensor, y: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return F.cross_entropy(logits, y), logits, logits.new_zeros(())

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def trains_model_alone(method: str) -> bool:
    return method == SOURCE


def trainable_engine(method: str, model: nn.Module, example: torch.Tensor, config,
                     model_name: str = "") -> nn.Module:
    """What the trainer trains: `Supervised(model)` for source, else the method's engine."""
    if trains_model_alone(method):
        return Supervised(model)
    from pipeline.model_spec import make_engine

    return make_engine(method, model, example, config, model_name)


def checkpoint_weights(method: str, engine: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict a checkpoint stores: the model's own for source, else the engine's."""
    return engine.model.state_dict() if trains_model_alone(method) else engine.state_dict()
