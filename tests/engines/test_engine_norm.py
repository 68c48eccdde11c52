"""A BatchNorm model: construction leaves it untouched, "norm" adapts only the affine
parameters, and episodic restore also restores running statistics updated in train mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import engines


class TinyBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, stride=2)
        self.bn1 = nn.BatchNorm2d(4)
        self.fc2 = nn.Linear(4 * 13 * 13, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn1(self.conv1(x))).flatten(1))


@pytest.mark.parametrize("name", [n for n in engines.list_engines()
                                  if engines.get_engine(n).needs_joint_training])
def test_norm_adaptation_and_train_mode_restore(name, batch, state_of):
    torch.manual_seed(0)
    model = TinyBN().train()
    before_build = state_of(model)
    cls = engines.get_engine(name)
    layer = {"ttt": "fc2"}.get(name, "conv1")
    engine = cls(model, batch[0][:2], cls.config_cls(layer=layer, adapt_params="norm"))
    assert model.training and all(m.training for m in model.modules())
    after_build = state_of(model)
    assert all(torch.equal(before_build[k], after_build[k]) for k in before_build)
    assert [n for n, _ in engine.adapted_parameters()] == ["model.bn1.weight", "model.bn1.bias"]

    engine.train()  # BN uses and updates batch statistics during this adaptation
    before = state_of(engine)
    engine.adapt(batch[0], steps=2, lr=1e-2)
    after = state_of(engine)
    assert all(torch.equal(before[k], after[k]) for k in before)

    engine.adapt(batch[0], steps=2, lr=1e-2, mode="online")
    after = state_of(engine)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"model.bn1.weight", "model.bn1.bias"} <= changed
    assert changed <= {"model.bn1.weight", "model.bn1.bias", "buffer:model.bn1.running_mean",
                       "buffer:model.bn1.running_var", "buffer:model.bn1.num_batches_tracked"}
    engine.reset()
    after = state_of(engine)
    assert all(torch.equal(before[k], after[k]) for k in before)
