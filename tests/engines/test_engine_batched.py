"""Batched episodes (engines/batched.py): G episodes at once equal G sequential episodic
`adapt` calls (every step's logits and losses), leave the engine untouched, fall back with one
warning on models vmap cannot batch, and are deterministic; per-sample TTT on augmented copies
gives the same predictions for every number of images run at once."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import engines
from engines.batched import adapt_per_sample, augmented_copies, batched_refusal

ATOL = 1e-4  # float rounding: a grouped convolution sums in another order than G single ones


def sequential(engine: engines.Engine, xs: torch.Tensor, **kwargs) -> engines.AdaptResult:
    results = [engine.adapt(x, mode="episodic", **kwargs) for x in xs]
    return engines.AdaptResult(logits=torch.stack([r.logits for r in results], 1),
                               losses=torch.stack([r.losses for r in results], 1))


def assert_close(a: engines.AdaptResult, b: engines.AdaptResult, atol: float = ATOL) -> None:
    assert a.logits.shape == b.logits.shape and a.losses.shape == b.losses.shape
    torch.testing.assert_close(a.logits, b.logits, atol=atol, rtol=0)
    torch.testing.assert_close(a.losses, b.losses, atol=atol, rtol=0)


@pytest.fixture
def episodes(batch) -> torch.Tensor:
    return batch[0].reshape(3, 4, 1, 28, 28)                         # (G, B, C, H, W)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("name, config", [
    ("ttt", {}), ("ttt", {"rotations": "rand"}), ("ttt", {"adapt_params": "all"}),
    ("ttt", {"gate": "entropy"}),
    ("it3", {}), ("it3", {"variant": "torch_ttt", "lr": 1e-4}),
    ("it3", {"null": "learned", "adapt_params": "all"})])
def test_equals_sequential_episodes(name, config, optimizer, make_engine, episodes, state_of):
    # the adaptation itself, ungated (the gate has its own case), at the step size these cases
    # were written for (IT3's Adam 4e-4: a 25x larger sign step amplifies rounding past ATOL)
    pinned = {"gate": "none", **({"lr": 4e-4} if name == "it3" else {})}
    engine = make_engine(name, steps=3, optimizer=optimizer, **{**pinned, **config}).eval()
    before = state_of(engine)
    batched = engine.adapt_episodes(episodes)
    assert batched_refusal(engine) is None
    assert batched.logits.shape == (4, 3, 4, 10) and batched.losses.shape == (3, 3)
    after = state_of(engine)
    assert all(torch.equal(before[k], after[k]) for k in before)     # nothing left behind
    reference = sequential(engine, episodes)
    assert_close(batched, reference)
    assert not torch.equal(batched.logits[0], batched.logits[-1])    # adaptation happened


@pytest.mark.parametrize("name", ["ttt", "it3"])
def test_lr_steps_optimizer_arguments_and_zero_steps(name, make_engine, episodes):
    engine = make_engine(name).eval()
    batched = engine.adapt_episodes(episodes, steps=2, lr=3e-3, optimizer="sgd")
    assert_close(batched, sequential(engine, episodes, steps=2, lr=3e-3, optimizer="sgd"))
    none = engine.adapt_episodes(episodes, steps=0)
    assert none.logits.shape == (1, 3, 4, 10) and none.losses.shape == (0, 3)
    with torch.no_grad():
        plain = torch.stack([engine.predict(x) for x in episodes])
    torch.testing.assert_close(none.logits[0], plain, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["ttt", "it3"])
def test_channels_last_is_irrelevant(name, make_engine, episodes):
    on = make_engine(name, steps=2, channels_last=True).eval()
    off = make_engine(name, steps=2, channels_last=False).eval()
    assert_close(on.adapt_episodes(episodes), off.adapt_episodes(episodes))


def test_one_episode_is_the_sequential_path(make_engine, episodes):
    engine = make_engine("ttt", steps=2).eval()
    one = engine.adapt_episodes(episodes[:1])
    alone = engine.adapt(episodes[0])
    assert torch.equal(one.logits[:, 0], alone.logits) and torch.equal(one.losses[:, 0],
                                                                          alone.losses)


def test_deterministic(make_engine, episodes):
    engine = make_engine("ttt", steps=2, rotations="rand").eval()
    first, second = engine.adapt_episodes(episodes), engine.adapt_episodes(episodes)
    assert torch.equal(first.logits, second.logits) and torch.equal(first.losses, second.losses)
    other = make_engine("ttt", steps=2, rotations="rand").eval().adapt_episodes(episodes)
    assert torch.equal(first.logits, other.logits)


def test_bad_arguments(make_engine, episodes):
    engine = make_engine("ttt").eval()
    with pytest.raises(ValueError, match="steps >= 0 and lr > 0"):
        engine.adapt_episodes(episodes, steps=-1)
    with pytest.raises(ValueError, match="unknown optimizer"):
        engine.adapt_episodes(episodes, optimizer="rmsprop")
    with pytest.raises(ValueError, match="xs \\(G, B, ...\\)"):
        engine.adapt_episodes(episodes[:0])


class TinyBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, stride=2)
        self.bn1 = nn.BatchNorm2d(4)
        self.fc2 = nn.Linear(4 * 13 * 13, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn1(self.conv1(x))).flatten(1))


class ReadsValues(TinyBN):
    """A forward that turns a tensor into a Python number: vmap refuses it."""

    def forward(self, x):
        scale = 2.0 if x.abs().max().item() > 1e6 else 1.0
        return super().forward(x) * scale


@pytest.mark.parametrize("model_cls, train, why", [
    (TinyBN, True, "BatchNorm2d 'model.bn1' is in train mode"),
    (ReadsValues, False, "item"),
])
def test_fallback_warns_once_and_matches(model_cls, train, why, batch, episodes, state_of):
    torch.manual_seed(0)
    engine = engines.TTTEngine(model_cls(), batch[0][:2], engines.TTTConfig(steps=2))
    engine.train(train)
    before = state_of(engine)
    with pytest.warns(RuntimeWarning, match="batched episodes off for") as record:
        result = engine.adapt_episodes(episodes)
    assert len([w for w in record if "batched episodes" in str(w.message)]) == 1
    assert why in str(record[0].message) and why in batched_refusal(engine)
    after = state_of(engine)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert_close(result, sequential(engine, episodes), atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                               # cached: no second warning
        engine.adapt_episodes(episodes)


def test_eval_mode_batchnorm_is_batched(batch, episodes):
    torch.manual_seed(0)
    engine = engines.TTTEngine(TinyBN(), batch[0][:2], engines.TTTConfig(steps=2)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batched = engine.adapt_episodes(episodes)
    assert batched_refusal(engine) is None
    assert_close(batched, sequential(engine, episodes))


def test_augmented_copies(batch):
    x = batch[0][:3]
    copies = augmented_copies(x, 5, seeds=[7, 8, 9])
    assert copies.shape == (3, 5, 1, 28, 28)
    assert torch.equal(copies[:, 0], x)                              # copy 0 is the image
    assert not torch.equal(copies[:, 1:], x[:, None].expand(3, 4, 1, 28, 28))
    alone = augmented_copies(x[1:2], 5, seeds=[8])                   # per image, not per batch
    assert torch.equal(alone[0], copies[1])
    assert torch.equal(augmented_copies(x, 5, seeds=[7, 8, 9]), copies)
    assert (copies.amax(dim=(2, 3, 4)) <= x.amax(dim=(1, 2, 3))[:, None]).all()  # crops of x
    with pytest.raises(ValueError, match="one seed per image"):
        augmented_copies(x, 5, seeds=[1])


@pytest.mark.parametrize("name", ["ttt", "it3"])
def test_per_sample_equal_for_any_episodes(name, make_engine, batch):
    engine = make_engine(name, steps=2, optimizer="sgd", lr=1e-2).eval()
    x, seeds = batch[0][:5], [3, 1, 4, 1, 5]
    one = adapt_per_sample(engine, x, copies=4, seeds=seeds, episodes=1)
    many = adapt_per_sample(engine, x, copies=4, seeds=seeds, episodes=3)
    assert one.logits.shape == (3, 5, 10) and one.losses.shape == (2, 5)
    assert_close(one, many)
    alone = engine.adapt(augmented_copies(x[2:3], 4, seeds[2:3])[0])  # image 2 by hand
    torch.testing.assert_close(one.logits[:, 2], alone.logits[:, 0], atol=0, rtol=0)
