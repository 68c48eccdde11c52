"""The trainer on the GPU (scripts/gpu_check.sh runs these; they skip without CUDA,
`TTT_PIPE_GPU_DRY_RUN=1` runs them on the CPU): SGD training on the device gives the CPU's
weights, staged (pinned, prefetched) batches equal resident ones, mixed precision runs and keeps
fp32 weights, augmentation runs on the device, and an epoch still reads the device only at its end.
"""

from __future__ import annotations

import pytest
import torch
from gpu_helpers import DEVICE, HAVE_CUDA, needs_gpu
from helpers import count_host_reads

import engines
from pipeline.models import build_model
from pipeline.training import Batches, EpochLoop, resolve_recipe

SHAPE = (3, 32, 32)


def _data(n=40):
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 256, (n, *SHAPE), generator=g, dtype=torch.uint8), torch.arange(n) % 10


def _engine(method="ttt", device="cpu"):
    torch.manual_seed(0)
    net = build_model("seed_cnn", mean=0.5, std=0.25, in_channels=3, image_size=32)
    cls = engines.get_engine(method)
    return cls(net, torch.zeros(1, *SHAPE), cls.config_cls()).to(device)


def _loop(device, method="ttt", staged=None, **recipe):
    images, labels = _data()
    recipe = resolve_recipe("cifar10", method_lr=1e-3, image_shape=SHAPE,
                            **{"optimizer": "sgd", "lr": 0.05, "augment": "none", **recipe})
    return EpochLoop(_engine(method, device), recipe, Batches(images, labels, device, staged=staged),
                     None, epochs=1, batch_size=16, seed=0)


def _train(loop):
    while not loop.finished:
        loop.run(100)
    return loop


@needs_gpu
@pytest.mark.parametrize("method", ["ttt", "it3"])
def test_gpu_training_matches_cpu(method):
    cpu = _train(_loop(torch.device("cpu"), method)).engine.state_dict()
    gpu = _train(_loop(DEVICE, method)).engine.state_dict()
    assert cpu.keys() == gpu.keys()
    for k in cpu:
        assert gpu[k].device == DEVICE, k
        torch.testing.assert_close(gpu[k].cpu(), cpu[k], atol=1e-4, rtol=1e-4, msg=k)


@needs_gpu
def test_gpu_staged_batches_equal_resident():
    images, labels = _data(20)
    order = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    resident = Batches(images, labels, DEVICE, staged=False)
    staged = Batches(images, labels, DEVICE, staged=True)
    assert staged.staged and staged.images.is_pinned() == HAVE_CUDA
    for b in range(3):
        xr, yr = resident.batch(order, b, 8)
        xs, ys = staged.batch(order, b, 8)
        assert xs.device == DEVICE and torch.equal(xr, xs) and torch.equal(yr, ys)
    a = _train(_loop(DEVICE, staged=True)).engine.state_dict()
    b = _train(_loop(DEVICE, staged=False)).engine.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@needs_gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_mixed_precision_keeps_fp32_weights(precision):
    if precision == "fp16" and not HAVE_CUDA:
        pytest.skip("fp16 needs CUDA's GradScaler (the dry run has no GPU)")
    loop = _train(_loop(DEVICE, precision=precision))
    metrics = loop.metrics[-1]
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert all(p.dtype == torch.float32 and p.device == DEVICE for p in loop.engine.parameters())


@needs_gpu
@pytest.mark.parametrize("augment", ["cifar", "imagenet"])
def test_gpu_augmentation_runs_on_the_device(augment):
    loop = _train(_loop(DEVICE, augment=augment))
    assert loop.aug.device.type == DEVICE.type
    assert torch.isfinite(torch.tensor(loop.metrics[-1]["loss"]))


@needs_gpu
def test_gpu_epoch_reads_the_device_once(monkeypatch):
    loop = _loop(DEVICE)
    calls = count_host_reads(monkeypatch)
    loop.run(2)
    assert calls == []
    loop.run(100)
    monkeypatch.undo()
    assert calls == ["tolist"], calls
