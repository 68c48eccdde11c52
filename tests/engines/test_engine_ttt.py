"""Rotation TTT: the rotations, the head, and one 4B forward per step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import functional as TF

from engines import TTTConfig, TTTEngine, rotate_batch
from pipeline.models import build_model


def test_rotations_and_label_order_on_an_asymmetric_image():
    x = torch.arange(9.0).view(1, 1, 3, 3)      # [[0,1,2],[3,4,5],[6,7,8]]
    x = torch.cat([x, x + 100])                  # B = 2
    images, labels = rotate_batch(x)
    assert images.shape == (8, 1, 3, 3)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(images[:2], x)
    ccw90 = torch.tensor([[2.0, 5, 8], [1, 4, 7], [0, 3, 6]])
    assert torch.equal(images[2, 0], ccw90) and torch.equal(images[3, 0], ccw90 + 100)
    assert torch.equal(images[4, 0], torch.tensor([[8.0, 7, 6], [5, 4, 3], [2, 1, 0]]))
    assert torch.equal(images[6, 0], torch.tensor([[6.0, 3, 0], [7, 4, 1], [8, 5, 2]]))
    for k, angle in enumerate((0, 90, 180, 270)):  # torch-ttt's convention (torchvision)
        assert torch.equal(images[2 * k:2 * k + 2], TF.rotate(x, angle))


@pytest.mark.parametrize("layer, first", [("fc2", torch.nn.Linear), ("conv2", torch.nn.Conv2d)])
def test_head_follows_the_feature_shape(layer, first):
    engine = TTTEngine(build_model("seed_cnn"), torch.zeros(1, 1, 28, 28), TTTConfig(layer=layer))
    assert isinstance(engine.head[0], first)
    x = torch.rand(3, 1, 28, 28)
    logits, loss = engine.training_loss(x)
    assert logits.shape == (3, 10) and loss.dim() == 0


def test_non_square_images_are_refused():
    with pytest.raises(ValueError, match="square images"):
        TTTEngine(build_model("seed_cnn"), torch.zeros(1, 1, 28, 27))


def test_one_forward_of_4b_images_per_step(batch):
    engine = TTTEngine(build_model("seed_cnn"), batch[0][:1])
    sizes: list[int] = []
    handle = engine.model.register_forward_pre_hook(lambda _m, args: sizes.append(len(args[0])))
    try:
        engine.adapt(batch[0], steps=3)
        assert sizes == [48, 48, 48, 12]  # 3 steps of 4B, one final plain forward (torch-ttt: 5B/step)
        sizes.clear()
        engine.training_loss(batch[0])
        assert sizes == [48]
    finally:
        handle.remove()


def test_main_logits_are_the_zero_degree_quarter(batch):
    engine = TTTEngine(build_model("seed_cnn"), batch[0][:1])
    logits, rotation_loss = engine.training_loss(batch[0])
    torch.testing.assert_close(logits, engine.model(batch[0]), atol=1e-6, rtol=0)
    images, labels = rotate_batch(batch[0])
    feats = engine.model.fc2(engine.model.activation(engine.model.fc1(
        engine.model.activation(F.max_pool2d(engine.model.conv2(engine.model.activation(
            F.max_pool2d(engine.model.conv1(engine.model.normalize(images)), 2))), 2)).flatten(1))))
    expected = F.cross_entropy(engine.head(feats), labels)  # the head sees fc2's raw output
    torch.testing.assert_close(rotation_loss, expected, atol=1e-6, rtol=0)


def test_seed_defaults_follow_the_tutorial():
    c = TTTConfig()  # training: the tutorial's; test time: chosen on validation (benchmarks/gains.py)
    assert (c.layer, c.aux_weight, c.lr, c.optimizer) == ("fc2", 0.35, 1e-2, "adam")
    assert (c.steps, c.gate, c.adapt_params, c.batch_size) == (2, "entropy", "model", 32)
    t = TTTConfig.preset("seeds")  # the tutorial's whole setting
    assert (t.steps, t.gate) == (3, "none") and t.replace(steps=2, gate="entropy") == c


def test_rotate_batch_with_labels_rotates_each_image_by_its_label():
    x = torch.rand(5, 2, 4, 4)
    labels = torch.tensor([3, 0, 2, 1, 3])
    images, out_labels = rotate_batch(x, labels)
    assert images.shape == x.shape and out_labels is labels
    for i, k in enumerate(labels.tolist()):
        assert torch.equal(images[i], TF.rotate(x[i:i + 1], 90 * k)[0])


def test_rand_rotations_are_seeded_b_per_step_and_descend_their_loss(batch):
    model = build_model("seed_cnn")
    engine = TTTEngine(model, batch[0][:1], TTTConfig(rotations="rand", seed=3))
    seen: list[torch.Tensor] = []
    handle = engine.head.register_forward_hook(lambda _m, _a, out: seen.append(out))
    inputs: list[torch.Tensor] = []
    pre = engine.model.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    try:
        first = engine.adapt(batch[0], steps=3, lr=1e-2)
    finally:
        handle.remove()
        pre.remove()
    assert [len(t) for t in inputs] == [12, 12] * 3 + [12]  # per step: plain B, rotated B
    gen = torch.Generator().manual_seed(3)
    labels = [torch.randint(4, (12,), generator=gen) for _ in range(3)]
    assert len({tuple(t.tolist()) for t in labels}) > 1  # a new draw every step
    for step, lab in enumerate(labels):
        assert torch.equal(inputs[2 * step], batch[0])
        for i, k in enumerate(lab.tolist()):
            assert torch.equal(inputs[2 * step + 1][i], TF.rotate(batch[0][i:i + 1], 90 * k)[0])
    assert [tuple(out.shape) for out in seen] == [(12, 4)] * 3
    losses = torch.stack([F.cross_entropy(o, lab) for o, lab in zip(seen, labels)])
    torch.testing.assert_close(first.losses, losses.detach(), atol=1e-6, rtol=0)
    again = engine.adapt(batch[0], steps=3, lr=1e-2)      # re-seeded: same angles, same result
    assert torch.equal(again.logits, first.logits) and torch.equal(again.losses, first.losses)
    other = TTTEngine(copy.deepcopy(model), batch[0][:1], TTTConfig(rotations="rand", seed=4))
    other.head.load_state_dict(engine.head.state_dict())  # only the angles differ
    assert not torch.equal(other.adapt(batch[0], steps=3, lr=1e-2).losses, first.losses)
    plain = TTTEngine(copy.deepcopy(model), batch[0][:1], TTTConfig(seed=3))
    torch.testing.assert_close(first.logits[0], plain.adapt(batch[0], steps=0).logits[0],
                               atol=1e-6, rtol=0)            # step 0: the unadapted prediction
