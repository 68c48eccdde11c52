"""benchmarks/engine_speed.py's `reference_engine` (torch-ttt 0.0.2 on a copy of our model):
building torch-ttt's lazy head takes a train-mode forward, which must not leave the copy's
BatchNorm statistics different from ours — else "same %" compares two different models.
Skipped without the optional torch-ttt."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torch_ttt")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import engines  # noqa: E402
from engine_speed import reference_engine, run_ours, run_ref  # noqa: E402
from pipeline.models import build_model  # noqa: E402


def _ours(method: str) -> engines.Engine:
    torch.manual_seed(0)
    model = build_model("seed_cnn_bn", in_channels=1, image_size=28)
    with torch.no_grad():  # running statistics away from their init (as after training)
        model.train()
        model(torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1)))
    model.eval()
    cfg = (engines.TTTConfig(layer="fc2", gate="none") if method == "ttt"
           else engines.IT3Config.tutorial(distance="mse", layer="fc1"))
    ours = engines.get_engine(method)(model, torch.rand(1, 1, 28, 28), cfg)
    return ours.eval()


@pytest.mark.parametrize("method", ["ttt", "it3"])
def test_reference_starts_from_our_batchnorm_statistics(method):
    ours = _ours(method)
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    ref = reference_engine(method, ours, x)
    ref_model = ref.model if method == "ttt" else ref.model.net
    theirs = ref_model.state_dict()
    for name, value in ours.model.state_dict().items():
        assert torch.equal(theirs[name], value), name
    ours_logits = run_ours(ours, [x], 2)[0]                     # (3, B, C)
    for k in range(3):
        ref_out = run_ref(ref, [x], k, ours.config.lr)[0]
        if method == "it3":  # torch-ttt's IT3 wraps the model in a softmax
            ref_out = ref_out.log()
            ours_k = ours_logits[k].log_softmax(-1)
        else:
            ours_k = ours_logits[k]
        torch.testing.assert_close(ours_k, ref_out, rtol=1e-3, atol=1e-3)
