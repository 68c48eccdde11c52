"""Fixtures for the engine tests: tiny synthetic digit batches and engines on the seed nets."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import MODEL_FOR, digits

import engines
from pipeline.models import build_model


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return digits(12, seed=1, noise=0.3)


@pytest.fixture
def make_engine():
    """make_engine(name, model_seed=0, **config) -> a fresh engine on a fresh seed network."""
    def make(name: str, model_seed: int = 0, **config) -> engines.Engine:
        torch.manual_seed(model_seed)
        model = build_model(MODEL_FOR.get(name, "seed_rescnn"))
        cls = engines.get_engine(name)
        return cls(model, torch.zeros(1, 1, 28, 28), cls.config_cls(**config))
    return make


@pytest.fixture
def state_of():
    """state_of(module) -> {name: cloned tensor} of every parameter and buffer."""
    def snap(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        out = {n: t.detach().clone() for n, t in module.named_parameters()}
        out.update({f"buffer:{n}": t.detach().clone() for n, t in module.named_buffers()})
        return out
    return snap


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP spin-waits
    (15x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
