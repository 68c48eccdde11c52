"""pipeline.training without Ray: the seeds' default path is today's numerics, a resumed run is
bit-identical to an uninterrupted one, batches make no per-batch host round trips, augmentation,
mixed precision and the recipe's one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import count_host_reads, synthetic_digits

import engines
from pipeline.datasets import to_float
from pipeline.errors import TTTPipeError
from pipeline.models import build_model
from pipeline.training import (Batches, EpochLoop, TrainRecipe, augment_batch, build_optimizer, load_state,
                               resolve_recipe, save_state, split_train_val, state_uri)
from pipeline.training.augment import random_crop_flip, random_resized_crop_flip
from pipeline.training.data import to_pixels


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gray(n=48):
    images, labels = synthetic_digits(n, seed=3)
    return torch.from_numpy(images[:, None]), torch.from_numpy(labels)


def _rgb(n=24, size=32):
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return images, torch.arange(n) % 10


def _engine(method="ttt", channels=1, size=28, model="seed_cnn", seed=0, **cfg):
    torch.manual_seed(seed)
    kwargs = {"mean": 0.5, "std": 0.25}
    if channels != 1 or size != 28:
        kwargs.update(in_channels=channels, image_size=size)
    net = build_model(model, **kwargs)
    cls = engines.get_engine(method)
    return cls(net, torch.zeros(1, channels, size, size), cls.config_cls(**cfg))


def _weights(engine):
    return {k: v.clone() for k, v in engine.state_dict().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_pixels_are_to_float_bit_for_bit():
    images, _ = _gray()
    assert torch.equal(to_pixels(images), torch.from_numpy(to_float(images.numpy())))


@pytest.mark.parametrize("method", ["ttt", "it3"])
def test_default_recipe_is_the_seed_trainers_numerics(method):
    """The trainer before pipeline.training (float images, Adam, seeded randperm) gives the same weights."""
    images, labels = _gray()
    recipe = resolve_recipe("mnist", method_lr=1e-2, image_shape=(1, 28, 28))
    assert recipe == TrainRecipe(lr=1e-2)  # adam, no schedule, no augmentation, fp32, no held-out rows
    engine = _engine(method)
    loop = EpochLoop(engine, recipe, Batches(images, labels, torch.device("cpu")), None,
                     epochs=2, batch_size=16, seed=0)
    while not loop.finished:
        loop.run(2)

    old = _engine(method)
    x, y = torch.from_numpy(to_float(images.numpy())), labels
    opt = torch.optim.Adam(old.parameters(), lr=1e-2)
    shuffle = torch.Generator().manual_seed(0)
    old.train()
    for _ in range(2):
        order = torch.randperm(len(y), generator=shuffle)
        for b in range(3):
            idx = order[b * 16:(b + 1) * 16]
            loss, _, _ = old.joint_loss(x[idx], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    _assert_same(_weights(engine), _weights(old))
    assert [m["epoch"] for m in loop.metrics] == [1, 2] and "val_accuracy" not in loop.metrics[0]


def _rgb_loop(engine, recipe, images, labels, epochs=2):
    train_rows, val_rows = split_train_val(len(labels), recipe.val_fraction, 0)
    cpu = torch.device("cpu")
    return EpochLoop(engine, recipe, Batches(images[train_rows], labels[train_rows], cpu),
                     Batches(images[val_rows], labels[val_rows], cpu), epochs=epochs, batch_size=8, seed=0)


@pytest.mark.parametrize("augment", ["cifar", "imagenet"])
def test_resume_after_an_epoch_is_bit_identical(tmp_path, augment):
    """SGD + momentum + weight decay + cosine + augmentation + held-out rows: every piece of state."""
    images, labels = _rgb()
    recipe = resolve_recipe("cifar10", method_lr=1e-3, optimizer="sgd", lr=0.05, augment=augment,
                            val_fraction=0.25, image_shape=(3, 32, 32))
    assert (recipe.schedule, recipe.momentum, recipe.weight_decay) == ("cosine", 0.9, 5e-4)
    whole = _rgb_loop(_engine(channels=3, size=32), recipe, images, labels)
    while not whole.finished:
        whole.run(100)

    first = _rgb_loop(_engine(channels=3, size=32), recipe, images, labels)
    first.run(100)
    save_state(str(tmp_path / "ckpt"), first.state_dict())
    torch.manual_seed(1234)  # a new process: the global RNG is anywhere
    second = _rgb_loop(_engine(channels=3, size=32, seed=99), recipe, images, labels)
    second.load_state_dict(load_state(str(tmp_path / "ckpt")))
    assert second.epoch == 1
    second.run(100)
    assert second.finished
    _assert_same(_weights(second.engine), _weights(whole.engine))
    assert second.metrics == [{**m, "seconds": s["seconds"], "images_per_s": s["images_per_s"]}
                              for m, s in zip(whole.metrics, second.metrics)]
    assert all(0 <= m["val_accuracy"] <= 1 for m in whole.metrics)
    assert whole.metrics[1]["lr"] < whole.metrics[0]["lr"] < 0.05  # cosine, per batch
    assert state_uri(str(tmp_path / "ckpt")).endswith("ckpt.train-state/state.pt")


def test_no_host_round_trip_per_batch(monkeypatch):
    """An epoch of 6 batches reads the device twice: the epoch's sums and the validation count."""
    images, labels = _rgb(n=56)
    recipe = resolve_recipe("cifar10", method_lr=1e-3, optimizer="sgd", val_fraction=0.15,
                            image_shape=(3, 32, 32))
    loop = _rgb_loop(_engine(channels=3, size=32), recipe, images, labels, epochs=1)
    assert loop.batches_per_epoch == 6
    calls = count_host_reads(monkeypatch)
    loop.run(3)
    assert calls == []  # a chunk of batches reads nothing back
    loop.run(3)
    monkeypatch.undo()
    assert sorted(calls) == ["item", "tolist"], calls


def test_staged_batches_equal_resident_ones():
    images, labels = _rgb(n=20)
    order = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    resident = Batches(images, labels, torch.device("cpu"))
    staged = Batches(images, labels, torch.device("cpu"), staged=True)
    assert staged.staged and not resident.staged
    for b in range(3):  # 8 + 8 + 4: the prefetched batch is the one asked for next
        xr, yr = resident.batch(order, b, 8)
        xs, ys = staged.batch(order, b, 8)
        assert torch.equal(xr, xs) and torch.equal(yr, ys)
    with pytest.raises(ValueError, match="uint8"):
        Batches(images.float(), labels, torch.device("cpu"))


def test_split_train_val_is_seeded_and_disjoint():
    train, val = split_train_val(50, 0.1, seed=0)
    assert len(val) == 5 and len(train) == 45
    assert sorted(torch.cat([train, val]).tolist()) == list(range(50))
    assert torch.equal(split_train_val(50, 0.1, seed=0)[1], val)
    assert not torch.equal(split_train_val(50, 0.1, seed=1)[1], val)
    assert torch.equal(split_train_val(50, 0.0, seed=0)[0], torch.arange(50))
    with pytest.raises(TTTPipeError, match="leaves no training samples"):
        split_train_val(1, 0.5, seed=0)


def test_cifar_crop_is_a_shifted_window_or_its_mirror():
    x = torch.rand(16, 3, 32, 32)
    out = random_crop_flip(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flipped = 0
    for i in range(16):
        windows = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        plain = any(torch.equal(out[i], w) for w in windows)
        mirror = any(torch.equal(out[i], w.flip(2)) for w in windows)
        assert plain or mirror, i
        flipped += mirror and not plain
    assert 0 < flipped < 16
    again = random_crop_flip(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert not torch.equal(out, random_crop_flip(x, torch.Generator().manual_seed(1)))


def test_resized_crop_full_box_is_the_image_or_its_mirror():
    x = torch.rand(8, 3, 24, 40)
    out = random_resized_crop_flip(x, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    for i in range(8):
        assert torch.allclose(out[i], x[i], atol=1e-5) or torch.allclose(out[i], x[i].flip(2), atol=1e-5)
    small = random_resized_crop_flip(x, torch.Generator().manual_seed(0))
    assert small.shape == x.shape and not torch.allclose(small, x)
    assert small.min() >= 0 and small.max() <= 1
    assert torch.equal(augment_batch(x, "none", None), x)


def test_bf16_step_on_cpu_is_finite_and_trains():
    images, labels = _rgb(n=16)
    recipe = resolve_recipe("cifar10", method_lr=1e-3, precision="bf16", val_fraction=0,
                            image_shape=(3, 32, 32))
    engine = _engine(channels=3, size=32)
    before = _weights(engine)
    loop = _rgb_loop(engine, recipe, images, labels, epochs=1)
    report = loop.run(10)
    m = report["epoch_metrics"]
    assert report["finished"] and np.isfinite(m["loss"]) and np.isfinite(m["aux_loss"])
    assert any(not torch.equal(before[k], v) for k, v in engine.state_dict().items())


def test_fp16_on_cpu_is_a_one_line_error():
    images, labels = _rgb(n=8)
    recipe = resolve_recipe("cifar10", method_lr=1e-3, precision="fp16", image_shape=(3, 32, 32))
    with pytest.raises(TTTPipeError, match=r"fp16 needs a CUDA GPU.*bf16"):
        _rgb_loop(_engine(channels=3, size=32), recipe, images, labels)


def test_recipe_defaults_by_dataset_and_optimizer():
    gray = resolve_recipe("fashion-mnist", method_lr=1e-3, image_shape=(1, 28, 28))
    assert (gray.augment, gray.val_fraction, gray.optimizer) == ("none", 0.0, "adam")
    cifar = resolve_recipe("cifar10", method_lr=1e-3, image_shape=(3, 32, 32))
    assert (cifar.augment, cifar.val_fraction, cifar.lr) == ("cifar", 0.1, 1e-3)
    folder = resolve_recipe("folder:x-12345678", method_lr=1e-3, image_shape=(3, 224, 224))
    assert folder.augment == "imagenet"
    sgd = resolve_recipe("cifar10", method_lr=1e-3, optimizer="sgd", schedule="none", weight_decay=0)
    assert (sgd.lr, sgd.momentum, sgd.weight_decay, sgd.schedule) == (0.1, 0.9, 0.0, "none")
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert type(build_optimizer(params, TrainRecipe(weight_decay=0.01))) is torch.optim.AdamW
    assert type(build_optimizer(params, TrainRecipe())) is torch.optim.Adam
    assert type(build_optimizer(params, sgd)) is torch.optim.SGD


@pytest.mark.parametrize("kwargs, words", [
    ({"optimizer": "rmsprop"}, "--optimizer must be one of adam, sgd"),
    ({"schedule": "step"}, "--schedule must be one of none, cosine"),
    ({"augment": "mixup"}, "--augment must be one of none, cifar, imagenet"),
    ({"precision": "fp8"}, "--precision must be one of fp32, bf16, fp16"),
    ({"val_fraction": 1.0}, "--val-fraction must be a number >= 0 and < 1"),
    ({"val_fraction": -0.1}, "--val-fraction must be a number >= 0"),
    ({"momentum": 0.9}, "--momentum applies to --optimizer sgd only"),
    ({"optimizer": "sgd", "momentum": 1.5}, "--momentum must be a number >= 0 and < 1"),
    ({"weight_decay": float("nan")}, "--weight-decay must be a number >= 0"),
    ({"lr": 0.0}, "--lr must be a number > 0"),
])
def test_recipe_errors_are_one_line(kwargs, words):
    with pytest.raises(TTTPipeError) as info:
        resolve_recipe("cifar10", method_lr=1e-3, image_shape=(3, 32, 32), **kwargs)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_damaged_state_is_a_one_line_error(tmp_path):
    out = str(tmp_path / "ckpt")
    assert load_state(out) is None
    save_state(out, {"epoch": 1})
    (tmp_path / "ckpt.train-state" / "state.pt").write_bytes(b"not a torch file")
    with pytest.raises(TTTPipeError, match="delete .*ckpt.train-state to start the run over"):
        load_state(out)


def test_frozen_parameters_stay_out_of_the_optimizer():
    images, labels = _gray(n=32)
    engine = _engine()
    for p in engine.model.parameters():
        p.requires_grad_(False)
    frozen = {k: v.clone() for k, v in engine.model.state_dict().items()}
    loop = EpochLoop(engine, TrainRecipe(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.01),
                     Batches(images, labels, torch.device("cpu")), None, epochs=1, batch_size=16, seed=0)
    n_trainable = sum(1 for p in engine.parameters() if p.requires_grad)
    assert len(loop.optimizer.param_groups[0]["params"]) == n_trainable > 0
    loop.run(10)
    for k, v in engine.model.state_dict().items():
        assert torch.equal(v, frozen[k]), k


@pytest.mark.parametrize("method", ["ttt", "it3"])
def test_frozen_module_keeps_its_batchnorm_statistics(method):
    """`frozen` stays in eval mode while the engine trains: with requires_grad off, a BN model is
    bit-identical after training (validation included), and without `frozen` its statistics move."""
    images, labels = _gray(n=32)
    results = {}
    for frozen in (True, False):
        engine = _engine(method, model="seed_cnn_bn")
        engine.model.requires_grad_(False)
        before = {k: v.clone() for k, v in engine.model.state_dict().items()}
        aux = {k: v.clone() for k, v in engine.state_dict().items() if not k.startswith("model.")}
        data = Batches(images, labels, torch.device("cpu"))
        loop = EpochLoop(engine, TrainRecipe(lr=1e-2), data, Batches(images[:8], labels[:8], data.device),
                         epochs=2, batch_size=16, seed=0, frozen=(engine.model,) if frozen else ())
        while not loop.finished:
            loop.run(10)
        moved = [k for k, v in engine.model.state_dict().items() if not torch.equal(v, before[k])]
        results[frozen] = moved
        assert all(not torch.equal(engine.state_dict()[k], v) for k, v in aux.items() if k.endswith("weight"))
    assert results[True] == []
    assert any("running_mean" in k for k in results[False])


def test_nothing_to_train_is_a_one_line_error():
    images, labels = _gray(n=16)
    engine = _engine()
    engine.requires_grad_(False)
    with pytest.raises(TTTPipeError, match="nothing to train"):
        EpochLoop(engine, TrainRecipe(), Batches(images, labels, torch.device("cpu")), None,
                  epochs=1, batch_size=16, seed=0)
