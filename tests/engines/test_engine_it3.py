"""IT3: injection hooks, the frozen anchor, the torch-ttt variant, null signals, distances."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from engines import IT3Config, IT3Engine
from engines.hooks import add_to_output
from engines.it3 import DISTANCES
from pipeline.models import build_model


def make(**config) -> IT3Engine:
    torch.manual_seed(0)
    return IT3Engine(build_model("seed_rescnn"), torch.zeros(1, 1, 28, 28), IT3Config(**config))


def test_no_hook_outlives_a_call(batch):
    engine = make()
    engine.training_loss(*batch)
    engine.adapt(batch[0], steps=2)
    engine.predict(batch[0])
    assert not engine.model.conv1._forward_hooks
    with pytest.raises(RuntimeError), add_to_output(engine.model.conv1, torch.zeros(3, 10)):
        engine.model(batch[0])  # batch 12 vs delta 3: the hook raises, the block still cleans up
    assert not engine.model.conv1._forward_hooks


def test_training_needs_labels_and_accepts_one_hot(batch):
    engine = make()
    with pytest.raises(ValueError, match="IT3 training needs labels"):
        engine.training_loss(batch[0])
    logits, aux = engine.training_loss(*batch)
    logits_oh, aux_oh = engine.training_loss(batch[0], torch.nn.functional.one_hot(batch[1], 10).float())
    assert torch.equal(logits, logits_oh) and torch.equal(aux, aux_oh)


def test_the_label_signal_reaches_the_prediction(batch):
    engine = make()
    x = batch[0]
    with add_to_output(engine.model.conv1, engine.embedder(torch.eye(10)[batch[1]])):
        with_label = engine.model(x)
    assert not torch.allclose(with_label, engine.predict(x))


def test_paper_variant_uses_the_weights_frozen_at_the_batch_start(batch):
    engine = make(mode="online")
    x, dist = batch[0], DISTANCES["dot"]
    start = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    p0 = engine.predict(x).softmax(1)
    with add_to_output(engine.model.conv1, engine.embedder(p0)):
        manual0 = dist(engine.model(x).softmax(1), p0)  # at the start F == f
    result = engine.adapt(x, steps=1, lr=1e-2)
    torch.testing.assert_close(result.losses[0], manual0, atol=1e-6, rtol=0)
    # now f has moved; F must still be the start weights
    p0 = engine.predict(x).softmax(1)
    with add_to_output(engine.model.conv1, engine.embedder(p0)):
        frozen = dist(functional_call(engine.model, start, (x,)).softmax(1), p0)
        live = dist(engine.model(x).softmax(1), p0)
    loss = engine._step_loss(x)[1]
    torch.testing.assert_close(loss, frozen, atol=1e-6, rtol=0)
    assert not torch.allclose(loss, live, atol=1e-5)


def test_torch_ttt_variant_is_the_tutorial(batch):
    engine = make(variant="torch_ttt", null="learned")  # null is ignored by this variant
    x = batch[0]
    assert torch.equal(engine.predict(x), engine.model(x))  # pass 1: no injection
    p0 = engine.model(x).softmax(1)
    with add_to_output(engine.model.conv1, engine.embedder(p0)):
        expected = -(engine.model(x).softmax(1) * p0).sum(1).mean()
    torch.testing.assert_close(engine._step_loss(x)[1], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("null", ["zeros", "uniform", "learned", "none"])
def test_null_signals(null, batch):
    engine = make(null=null, adapt_params="all")
    x = batch[0]
    names = {n for n, _ in engine.adapted_parameters()}
    assert ("null_signal" in names) == (null == "learned")
    if null == "none":
        assert torch.equal(engine.predict(x), engine.model(x))
    else:
        assert not torch.allclose(engine.predict(x), engine.model(x))
    assert engine.adapt(x, steps=1).logits.shape == (2, 12, 10)


def test_full_embedder_covers_the_feature_map(batch):
    engine = make(embedder="full")
    assert engine.embedder(torch.eye(10)[:2]).shape == (2, 10, 24, 24)
    assert engine.adapt(batch[0], steps=1).losses.shape == (1,)


def test_detach_target_changes_the_gradient_not_the_loss(batch):
    a, b = make(), make(detach_target=True)
    ra, rb = a.adapt(batch[0], steps=2, lr=1e-2), b.adapt(batch[0], steps=2, lr=1e-2)
    assert torch.equal(ra.losses[0], rb.losses[0]) and not torch.equal(ra.logits[1], rb.logits[1])


def test_distances():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    a, b = torch.eye(3)[[0, 1]], torch.eye(3)[[1, 2]]
    for name in ("js", "mse", "cosine"):
        assert DISTANCES[name](p, p).abs() < 1e-6
    assert torch.isclose(DISTANCES["js"](a, b), torch.tensor(math.log(2)))
    assert torch.isclose(DISTANCES["dot"](p, p), -(p * p).sum(1).mean())
    assert torch.isclose(DISTANCES["cosine"](a, b), torch.tensor(1.0))
    q = torch.tensor([[1.0, 0.0, 0.0]], requires_grad=True)  # an underflowed softmax
    DISTANCES["js"](q, torch.tensor([[0.0, 1.0, 0.0]])).backward()
    assert torch.isfinite(q.grad).all()


def test_seed_defaults_follow_the_tutorial():
    c = IT3Config()
    assert (c.layer, c.train_epochs, c.train_batch_size, c.train_lr) == ("conv1", 2, 256, 1e-3)
    assert (c.steps, c.lr, c.batch_size, c.distance) == (1, 1e-3, 256, "dot")
