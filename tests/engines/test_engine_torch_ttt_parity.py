"""Same weights, same numbers as torch-ttt 0.0.2 (the `bench` extra; skipped without it).

Our TTT step is torch-ttt's minus its redundant plain-batch forward; our IT3
variant="torch_ttt" is its IT3Engine on a model that outputs softmax (as in its tutorial).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import engines
from pipeline.models import build_model

pytest.importorskip("torch_ttt")
from torch_ttt.engine.it3_engine import IT3Engine as RefIT3  # noqa: E402
from torch_ttt.engine.ttt_engine import TTTEngine as RefTTT  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


def test_ttt_matches_torch_ttt(batch):
    torch.manual_seed(0)
    model = build_model("seed_cnn")
    ours = engines.TTTEngine(model, batch[0][:1])
    ref = RefTTT(model, "fc2")
    ref.train()
    ref(batch[0])                                         # builds its head lazily
    ref.angle_head.load_state_dict(ours.head.state_dict())
    ref_logits, ref_loss = ref(batch[0])
    logits, loss = ours.training_loss(batch[0])
    torch.testing.assert_close(logits, ref_logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
    ref.eval()
    for k in range(4):
        ref.optimization_parameters = {"num_steps": k, "lr": 1e-2}
        out, _ = ref(batch[0])
        result = ours.adapt(batch[0], steps=k, lr=1e-2)
        torch.testing.assert_close(result.logits[k], out, atol=1e-5, rtol=1e-5)


class _Softmax(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.net = model

    def forward(self, x):
        return self.net(x).softmax(1)


def test_it3_torch_ttt_variant_matches_torch_ttt(batch):
    torch.manual_seed(0)
    model = build_model("seed_rescnn")
    ours = engines.IT3Engine(model, batch[0][:1], engines.IT3Config.tutorial(lr=1e-2))
    ref = RefIT3(_Softmax(model), "net.conv1", distance_fn=lambda a, b: -(a * b).sum(1).mean())
    ref.train()
    target = torch.eye(10)[batch[1]]
    ref(batch[0], target=target)                             # builds its embedder lazily
    ref.embeder.load_state_dict(ours.embedder.state_dict())
    ref_probs, ref_loss = ref(batch[0], target=target)
    logits, loss = ours.training_loss(batch[0], batch[1])
    torch.testing.assert_close(logits.softmax(1), ref_probs, atol=1e-6, rtol=0)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
    ref.eval()
    ref.optimization_parameters = {"num_steps": 2, "lr": 1e-2}
    out, _ = ref(batch[0])
    torch.testing.assert_close(ours.adapt(batch[0], steps=2).logits[-1].softmax(1), out,
                               atol=1e-5, rtol=1e-5)
