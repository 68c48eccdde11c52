"""The entropy gate: step k's prediction stands only where it is less uncertain than step 0's."""

from __future__ import annotations

import math

import pytest
import torch
from engine_helpers import MODEL_FOR, digits

import engines
from pipeline.models import build_model


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    p = logits.softmax(-1)
    return -(p * p.log()).sum(-1)


def test_gate_keeps_a_step_only_where_its_entropy_fell():
    step0 = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])           # (B=2, C=3)
    sure = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.9, 0.0]])             # sample 0 sharper, 1 flatter
    gated = engines.entropy_gate(torch.stack([step0, sure]))
    assert torch.equal(gated[0], step0)
    assert torch.equal(gated[1, 0], sure[0])                             # entropy fell: kept
    assert torch.equal(gated[1, 1], step0[1])                            # entropy rose: step 0
    assert _entropy(sure[1:2]) > _entropy(step0[1:2])


def test_equal_entropy_falls_back_to_step_0():
    step0 = torch.tensor([[1.0, 0.0]])
    swapped = torch.tensor([[0.0, 1.0]])                                # same entropy, other class
    gated = engines.entropy_gate(torch.stack([step0, swapped]))
    assert torch.equal(gated[1], step0)


def _trained(method: str, gate: str) -> engines.Engine:
    """A briefly trained seed net (confident predictions: adaptation can then raise entropy)."""
    x, y = digits(64, seed=1)
    cls = engines.get_engine(method)
    torch.manual_seed(0)
    engine = cls(build_model(MODEL_FOR[method]), torch.zeros(1, 1, 28, 28),
                 cls.config_cls(gate=gate, lr=0.01))
    opt = torch.optim.Adam(engine.parameters(), lr=1e-2)
    engine.train()
    for _ in range(30):
        opt.zero_grad()
        engine.joint_loss(x, y)[0].backward()
        opt.step()
    return engine.eval()


@pytest.mark.parametrize("method", ["ttt", "it3"])
def test_gated_adapt_is_the_gate_of_the_plain_run_and_stays_anytime(method):
    x, _ = digits(16, seed=3, noise=0.6)
    runs = {gate: _trained(method, gate) for gate in ("none", "entropy")}
    plain, gated = (runs[g].adapt(x, steps=3) for g in ("none", "entropy"))
    assert torch.equal(gated.logits, engines.entropy_gate(plain.logits))
    assert torch.equal(gated.losses, plain.losses)                      # the gate changes no step
    if method == "ttt":  # measured: TTT raises some samples' entropy here (IT3 lowers all)
        changed = (gated.logits[1:] != plain.logits[1:]).any(-1)
        assert changed.any() and not changed.all()
    for k in range(4):                                                  # anytime: step k == K=k run
        assert torch.equal(runs["entropy"].adapt(x, steps=k).logits[-1], gated.logits[k])


def test_unknown_gate_is_a_one_line_error():
    with pytest.raises(ValueError, match="unknown gate 'sometimes'; choose from: entropy, none"):
        engines.get_engine("ttt").config_cls(gate="sometimes")


def test_gate_never_raises_entropy():
    torch.manual_seed(1)
    logits = torch.randn(5, 64, 10) * 3
    gated = engines.entropy_gate(logits)
    ent = _entropy(gated)
    assert (ent[1:] <= ent[:1] + 1e-6).all()
    assert math.isclose(float(ent[0].sum()), float(_entropy(logits[0]).sum()))
