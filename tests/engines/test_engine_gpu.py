"""Every registered engine on the GPU (scripts/gpu_check.sh runs these; they skip without CUDA,
`TTT_PIPE_GPU_DRY_RUN=1` runs them on the CPU): adapting on the device gives the CPU's
predictions, every tensor of the result and of the engine's state stays on the device, episodic
restore holds there, and batched episodes equal the sequential ones on the device.

Tolerance 1e-3: a CUDA reduction order differs from the CPU's, two Adam steps amplify the last
bits, and the baselines' thresholds (EATA's, SAR's, CoTTA's) are compared against such values.
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import make_tiny_engine, rgb_batch
from gpu_helpers import DEVICE, needs_gpu

import engines

ENGINES = engines.list_engines()
TOL = {"atol": 1e-3, "rtol": 1e-3}


def _on(engine, device) -> set[torch.device]:
    return {t.device for t in list(engine.parameters()) + list(engine.buffers())} or {torch.device(device)}


@needs_gpu
@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize("name", ENGINES)
def test_engine_on_gpu_matches_cpu(name, norm):
    x = rgb_batch(8, seed=1, shift=0.2)
    cpu = make_tiny_engine(name, norm).adapt(x, steps=2, lr=1e-2, mode="episodic")
    engine = make_tiny_engine(name, norm).to(DEVICE)
    assert _on(engine, DEVICE) == {DEVICE}
    before = {k: v.clone() for k, v in engine.state_dict().items()}
    gpu = engine.adapt(x.to(DEVICE), steps=2, lr=1e-2, mode="episodic")
    assert gpu.logits.device == DEVICE and gpu.losses.device == DEVICE
    torch.testing.assert_close(gpu.logits.cpu(), cpu.logits, **TOL)
    torch.testing.assert_close(gpu.losses.cpu(), cpu.losses, **TOL)
    after = engine.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "episodic restore on the device"
    assert _on(engine, DEVICE) == {DEVICE}


@needs_gpu
@pytest.mark.parametrize("name", ENGINES)
def test_online_state_stays_on_gpu(name):
    engine = make_tiny_engine(name).to(DEVICE)
    for seed in (2, 3):
        engine.adapt(rgb_batch(8, seed=seed, shift=0.2).to(DEVICE), steps=1, lr=1e-2, mode="online")
    assert _on(engine, DEVICE) == {DEVICE}
    engine.reset()
    fresh = make_tiny_engine(name).to(DEVICE)
    x = rgb_batch(8, seed=4).to(DEVICE)
    torch.testing.assert_close(engine.predict(x), fresh.predict(x), atol=1e-6, rtol=0)


@needs_gpu
@pytest.mark.parametrize("name", ["ttt", "it3", "tent", "sar"])
def test_batched_episodes_on_gpu_equal_sequential(name):
    engine = make_tiny_engine(name).to(DEVICE)
    xs = torch.stack([rgb_batch(8, seed=s, shift=0.2) for s in (14, 15, 16)]).to(DEVICE)
    result = engine.adapt_episodes(xs, steps=2, lr=1e-2)
    assert result.logits.device == DEVICE
    for g in range(len(xs)):
        one = engine.adapt(xs[g], steps=2, lr=1e-2, mode="episodic")
        torch.testing.assert_close(result.logits[:, g], one.logits, atol=1e-4, rtol=1e-4)
