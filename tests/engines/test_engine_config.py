"""Configs round-trip and refuse bad values with one-line messages; layers are found by name."""

from __future__ import annotations

import dataclasses
import warnings
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import engines
from engines import IT3Config, TTTConfig, find_module
from pipeline.models import build_model


@pytest.mark.parametrize("cls", [TTTConfig, IT3Config])
def test_round_trip_through_json(cls):
    config = cls(steps=5, lr=3e-4, mode="online")
    assert cls.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.steps = 1
    assert config.replace(steps=2).steps == 2


def test_unknown_keys_and_values_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown TTTConfig key.*stepz; choose from: .*steps"):
        TTTConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="unknown distance 'l1'; choose from: cosine, dot, js, mse"):
        IT3Config(distance="l1")
    with pytest.raises(ValueError, match="unknown adapt_params 'head'"):
        TTTConfig(adapt_params="head")
    with pytest.raises(ValueError, match="TTTConfig.steps must be a int"):
        TTTConfig(steps="3")
    with pytest.raises(ValueError, match="steps and train_epochs must be >= 0"):
        TTTConfig(steps=-1)
    assert TTTConfig(lr=1).lr == 1.0 and isinstance(TTTConfig(lr=1).lr, float)


def test_engine_takes_a_dict_config_and_refuses_the_wrong_class():
    model = build_model("seed_cnn")
    engine = engines.get_engine("ttt")(model, torch.zeros(1, 1, 28, 28), {"steps": 2})
    assert engine.config == TTTConfig(steps=2)
    with pytest.raises(ValueError, match="TTTEngine needs a TTTConfig, got IT3Config"):
        engines.TTTEngine(model, torch.zeros(1, 1, 28, 28), IT3Config())


def test_find_module_names_the_choices():
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(1, 2, 3))
    model.add_module("head", nn.Sequential(nn.Linear(2, 2)))
    assert find_module(model, "head.0") is model.head[0]
    with pytest.raises(ValueError, match=r"^unknown layer 'conv9' in Sequential; "
                                         r"choose from: conv1, head, head.0$"):
        find_module(model, "conv9")


@pytest.mark.parametrize("name", ["ttt", "it3"])
def test_channels_last_changes_layout_not_results(name, make_engine, batch):
    fast, plain = make_engine(name), make_engine(name, channels_last=False)
    cl = torch.channels_last
    conv = fast.model.conv2.weight  # (20, 10, 5, 5): the layouts differ
    seen = []                       # conv1's output layout during adapt (C=1 weight included)
    fast.model.conv1.register_forward_hook(
        lambda _m, _i, out: seen.append(out.is_contiguous(memory_format=cl)
                                        and not out.is_contiguous()))
    a, b = fast.adapt(batch[0], steps=2, lr=1e-2), plain.adapt(batch[0], steps=2, lr=1e-2)
    assert seen and all(seen)
    assert conv.is_contiguous() and fast.model.conv1.weight.is_contiguous()  # restored after
    assert dict(fast.named_parameters())["model.conv2.weight"] is conv  # identity kept
    torch.testing.assert_close(a.logits[0], b.logits[0], atol=1e-5, rtol=1e-5)
    # after a step, rounding differences of near-zero gradients (IT3's loss starts ~1e-4) are
    # turned by Adam's normalised step into weight differences of order lr: looser, still far
    # below what a wrong layout (transposed weights) would give
    torch.testing.assert_close(a.logits, b.logits, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(a.losses, b.losses, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", ["ttt", "it3"])
def test_adam_eps_sets_the_size_of_the_first_step(name, make_engine, batch, state_of):
    """Adam's first step is lr * g / (|g| + eps): a sign step of size lr at torch's eps, and
    about lr * |g| / eps (far smaller) when eps is much larger than the gradients."""
    x, _ = batch
    moves = {}
    for eps in (1e-8, 1e3):
        engine = make_engine(name, adam_eps=eps, lr=1e-2, mode="online", optimizer="adam")
        engine.eval()
        before = state_of(engine.model)
        engine.adapt(x, steps=1)
        after = state_of(engine.model)
        moves[eps] = max(float((after[k] - before[k]).abs().max()) for k in before)
    assert moves[1e-8] == pytest.approx(1e-2, rel=1e-3)
    assert 0 < moves[1e3] < 1e-4
    with pytest.raises(ValueError, match="adam_eps must be > 0"):
        engines.IT3Config(adam_eps=0.0)


@pytest.mark.parametrize("fused", [False, True])
def test_users_optimizer_survives_adapt(fused):
    """Train, adapt, train on: with a fused Adam (its state laid out like the parameters) the
    result equals an engine that never changes layouts."""
    torch.manual_seed(0)
    fast = engines.TTTEngine(build_model("seed_cnn"), torch.zeros(1, 1, 28, 28))
    plain = engines.TTTEngine(build_model("seed_cnn"), torch.zeros(1, 1, 28, 28),
                              TTTConfig(channels_last=False))
    plain.load_state_dict(fast.state_dict())
    x, y = torch.rand(64, 1, 28, 28), torch.randint(10, (64,))
    out = []
    for engine in (fast, plain):
        opt = torch.optim.Adam(engine.parameters(), lr=1e-3, fused=fused)
        for _ in range(2):
            engine.train()
            for _ in range(3):
                opt.zero_grad()
                engine.joint_loss(x, y)[0].backward()
                opt.step()
            engine.eval()
            engine.adapt(x[:32], steps=2)
        out.append(engine.predict(x))
    torch.testing.assert_close(out[0], out[1], atol=1e-5, rtol=1e-5)


class _Viewing(nn.Module):
    """The classic MNIST net's `x.view(-1, 320)` after the convs: fails on channels_last
    activations."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, 5)
        self.conv2 = nn.Conv2d(10, 20, 5)
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        return self.fc2(F.relu(self.fc1(x.view(-1, 320))))


@pytest.mark.parametrize("name", ["ttt", "it3"])
def test_channels_last_turns_itself_off_for_a_model_that_views(name, batch):
    cls = engines.get_engine(name)
    with pytest.warns(RuntimeWarning, match="channels_last off for _Viewing: .*view"):
        torch.manual_seed(0)
        fast = cls(_Viewing(), torch.zeros(1, 1, 28, 28), cls.config_cls(layer="fc1"))
    torch.manual_seed(0)
    plain = cls(_Viewing(), torch.zeros(1, 1, 28, 28),
                cls.config_cls(layer="fc1", channels_last=False))
    assert torch.equal(fast.adapt(batch[0], 2).logits, plain.adapt(batch[0], 2).logits)


class _BatchStats(nn.Module):
    """Batch-statistics norm after a conv: a zeros example input gives 0/0-like outputs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 5)
        self.norm = nn.BatchNorm2d(4, track_running_stats=False)
        self.fc1 = nn.Linear(4 * 24 * 24, 10)

    def forward(self, x):
        return self.fc1(self.norm(self.conv1(x)).flatten(1))


class _Positional(nn.Module):
    """A 4-D parameter that is not a conv weight: channels_last re-strides it for adapt(), and
    its gradient (from an add) comes back contiguous."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.pos = nn.Parameter(torch.randn(1, 4, 26, 26) * 0.1)
        self.fc = nn.Linear(4 * 26 * 26, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x) + self.pos)
        return self.out(torch.relu(self.fc(h.flatten(1))))


@pytest.mark.parametrize("name", ["ttt", "it3"])
def test_channels_last_steps_a_4d_parameter_whose_gradient_has_other_strides(name, batch):
    """Fused Adam pairs parameter and gradient elements by memory position: a gradient laid out
    unlike its parameter updated the wrong elements (logits off by ~0.04 after 2 steps)."""
    out = []
    for cl in (True, False):
        torch.manual_seed(0)
        cls = engines.get_engine(name)
        engine = cls(_Positional().eval(), batch[0][:1],
                     cls.config_cls(layer="fc", channels_last=cl, lr=1e-2))
        out.append(engine.adapt(batch[0], 2).logits)
    torch.testing.assert_close(out[0], out[1], atol=1e-4, rtol=1e-4)


class _NonDense(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 8)
        self.fc.weight = nn.Parameter(torch.randn(8, 8)[:, ::2])   # (8, 4), strides (8, 2)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1)
        return self.out(torch.relu(self.fc(h)))


def test_a_non_dense_parameter_is_stepped_like_a_dense_one(batch):
    """No gradient can be laid out like a non-dense parameter, and fused Adam pairs elements by
    memory position (logits off by 7e-3 after 3 steps): such engines use the for-loop Adam."""
    out = []
    for dense in (False, True):
        torch.manual_seed(0)
        model = _NonDense().eval()
        if dense:
            model.fc.weight = nn.Parameter(model.fc.weight.detach().contiguous())
        engine = engines.TTTEngine(model, batch[0][:1], TTTConfig(layer="fc"))
        out.append(engine.adapt(batch[0], 3).logits)
    torch.testing.assert_close(out[0], out[1], atol=1e-6, rtol=1e-6)


class _Expanded(nn.Module):
    """An expanded (stride-0) 4-D parameter, registered before the convs."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter((torch.rand(1, 4, 1, 1) + 0.5).expand(2, 4, 7, 7))
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 7 * 7, 5)

    def forward(self, x):
        h = self.conv2(F.max_pool2d(torch.relu(self.conv(x)), 4)) * self.scale[:1]
        return self.fc(h.flatten(1))


def test_channels_last_leaves_every_parameter_its_layout(batch):
    """Review: re-striding an expanded parameter back failed mid-way, leaving it and every
    parameter after it channels_last for good."""
    torch.manual_seed(0)
    model = _Expanded().eval()
    model.scale.requires_grad_(False)   # (no optimizer can step a stride-0 tensor)
    before = {n: p.stride() for n, p in model.named_parameters()}
    engine = engines.TTTEngine(model, batch[0][:1], TTTConfig(layer="fc"))
    assert engine._channels_last_ok
    engine.adapt(batch[0], 1)
    assert {n: p.stride() for n, p in model.named_parameters()} == before


def test_an_expanded_parameter_to_adapt_is_a_clear_error(batch):
    with pytest.raises(ValueError, match=r"parameter model\.scale is an expanded view "
                                         r"\(stride 0\).*nn\.Parameter\(t\.clone\(\)\)"):
        engines.TTTEngine(_Expanded().eval(), batch[0][:1], TTTConfig(layer="fc"))


def test_channels_last_check_does_not_trip_on_a_zeros_example():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = engines.TTTEngine(_BatchStats(), torch.zeros(1, 1, 28, 28),
                                   TTTConfig(layer="conv1"))
    assert engine._channels_last_ok


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_moving_the_engine_during_an_online_run(optimizer, make_engine, batch):
    engine = make_engine("ttt", mode="online", optimizer=optimizer)
    engine.adapt(batch[0], 1)
    engine.to(torch.float64)  # the optimizer state is float32: reset, not a dtype error
    assert engine.adapt(batch[0].double(), 1).logits.dtype == torch.float64


class _Sqrt(nn.Module):
    """Valid for x >= 0 only: NaN logits on a random input, in either layout."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 5)
        self.fc1 = nn.Linear(4 * 24 * 24, 10)

    def forward(self, x):
        return self.fc1(self.conv1(x.sqrt()).flatten(1))


def test_channels_last_check_treats_nan_alike():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = engines.TTTEngine(_Sqrt(), torch.zeros(1, 1, 28, 28), TTTConfig(layer="conv1"))
    assert engine._channels_last_ok


def test_seeds_preset_pins_the_seeds_protocol_whatever_the_defaults():
    """The "seeds" preset is the seeds' protocol written out in full (the torch-ttt tutorial
    for TTT; the setting of the seeds' record for IT3), not a view of today's defaults."""
    from engines.config import IT3Config, TTTConfig

    t = TTTConfig.preset("seeds")
    assert (t.layer, t.aux_weight, t.train_epochs, t.train_batch_size, t.train_lr) == (
        "fc2", 0.35, 1, 64, 1e-2)
    assert (t.optimizer, t.lr, t.steps, t.batch_size, t.adapt_params, t.gate, t.adam_eps) == (
        "adam", 1e-2, 3, 32, "model", "none", 1e-8)
    i = IT3Config.preset("seeds")
    assert (i.layer, i.aux_weight, i.variant, i.distance, i.hint_self, i.hint_dropout) == (
        "fc1", 2.0, "paper", "js", 1.0, 0.5)
    assert (i.optimizer, i.lr, i.steps, i.batch_size, i.adapt_params, i.gate) == (
        "adam", 4e-4, 3, 256, "model", "none")
    assert (i.train_epochs, i.train_batch_size, i.train_lr) == (2, 256, 1e-3)
    for cls in (TTTConfig, IT3Config):   # every pinned key is a field, and changes apply last
        assert set(cls.presets["seeds"]) <= set(cls.__dataclass_fields__)
        assert cls.preset("seeds", steps=7).steps == 7
    assert IT3Config.preset("tutorial") == IT3Config.tutorial()
    with pytest.raises(ValueError, match="unknown TTTConfig preset 'nope'; choose from: seeds"):
        TTTConfig.preset("nope")
