"""TTT's rotations folded into the leading convolutions (engines/rotation_fold.py): the folded
prefix gives the rotated batch's values and gradients, stops folding where it must, and the
engine adapts as without it."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine_helpers import engine_pair

from engines.rotation_fold import rotated_copies, unstack
from engines.split import LayerSplit
from engines.ttt import TTTEngine
from pipeline.models import build_model


class _Folds(nn.Module):
    """Everything the fold runs folded: scalar normalisation (a buffer, a parameter), a conv on
    the image, max-pool, activations, a grouped padded conv, a residual add, a strided conv,
    average pooling; then h.mean() (the whole batch) needs the 4B batch."""

    def __init__(self, groups: int = 2):
        super().__init__()
        self.register_buffer("mean", torch.tensor(0.2))
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.conv1 = nn.Conv2d(1, 4, 5)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=groups)
        self.conv3 = nn.Conv2d(4, 6, 2, stride=2)
        self.fc1 = nn.Linear(6 * 3 * 3, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        x = (x - self.mean) * 2.0
        h = F.leaky_relu(F.max_pool2d(self.conv1(x), 2))        # (4, 12, 12)
        h = torch.tanh(self.conv2(h)) * self.scale + h          # (4, 12, 12)
        h = F.avg_pool2d(torch.relu(self.conv3(h)), 2)          # (6, 3, 3)
        h = h + h.mean()                                        # not folded
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))


class _Plain(nn.Module):
    """Like the seed CNN: folded all the way to the flatten."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 5)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.fc1 = nn.Linear(6 * 6 * 6, 16)
        self.fc2 = nn.Linear(16, 5)
        self.act = nn.LeakyReLU()

    def forward(self, x):
        h = self.act(F.max_pool2d(self.conv1(x / 0.5 - 0.1), 2))   # (4, 12, 12)
        h = self.act(F.max_pool2d(self.conv2(h), 2))                # (6, 6, 6)
        return self.fc2(self.act(self.fc1(h.flatten(1))))


def _build(model: nn.Module, x: torch.Tensor, layer: str = "fc1") -> LayerSplit:
    """The split with the fold; a fold that its own check has to refuse (a RuntimeWarning:
    something folded that should not have been) fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        return LayerSplit.build(model, layer, rotated_copies(x[:2]), channel_delta=False,
                                rows_check=(rotated_copies(x[:2]), 2), fold_check=x[:2])


def _unfolded_before(model: nn.Module, x: torch.Tensor, op: str, layer: str = "fc"
                     ) -> LayerSplit:
    """The folded prefix turns its values back into the 4B batch before `op` runs, and gives
    the rotated batch's values."""
    split = _build(model, x, layer)
    code = split.rotated.code
    back = [code.index(m) for m in ("unstack(", "rotated_copies(") if m in code]
    assert back and min(back) < code.index(op), code
    torch.testing.assert_close(split.cut_rotated(x)[0], split.prefix(rotated_copies(x))[0])
    return split


def _grads(out: tuple, params: list[torch.Tensor]) -> tuple:
    return torch.autograd.grad(sum(o.square().sum() for o in out), params, allow_unused=True)


@pytest.mark.parametrize("make", [_Plain, _Folds, lambda: _Folds(groups=1)])
def test_the_folded_prefix_gives_the_rotated_values_and_gradients(make, batch):
    torch.manual_seed(0)
    model = make().double().eval()
    x = batch[0].double()
    split = _build(model, x)
    assert split is not None and split.rotated is not None
    params = list(model.parameters())
    folded, plain = split.cut_rotated(x), split.prefix(rotated_copies(x))
    assert [o.shape for o in folded] == [o.shape for o in plain]
    for a, b in zip(folded, plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    grads = list(zip(_grads(folded, params), _grads(plain, params)))
    assert sum(a is not None for a, _ in grads) >= 4
    for a, b in grads:
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_the_fold_stops_before_what_it_cannot_fold(batch):
    """_Folds: conv3's stride-2 grid fits 12x12 ((12 - 2) % 2 == 0), so it folds; h.mean()
    reads the whole batch: it runs on the 4B batch."""
    torch.manual_seed(0)
    model = _Folds().eval()
    split = _build(model, batch[0])
    code = split.rotated.code
    assert code.count("conv_same(") == 1 and code.count("conv_stacked(") == 2
    assert code.index("unstack(") < code.index(".mean(")   # h.mean() runs on the 4B batch


class _Misaligned(nn.Module):
    """A window grid that cuts off the last row/column: (size + 2p - d(k-1) - 1) % s != 0."""

    def __init__(self, where: str):
        super().__init__()
        self.where = where
        self.conv1 = nn.Conv2d(1, 2 if where == "conv" else 1, 5)
        self.conv2 = nn.Conv2d(2, 3, 3, stride=2)
        self.fc = nn.Linear(3 * 5 * 5 if where == "conv" else 4 * 4, 5)

    def forward(self, x):
        h = self.conv1(x)                                        # (C, 24, 24)
        if self.where == "pool":
            return self.fc(F.max_pool2d(h, 5).flatten(1))        # (24 - 4 - 1) % 5 == 4
        h = F.max_pool2d(h, 2)                                   # (2, 12, 12)
        return self.fc(torch.relu(self.conv2(h)).flatten(1))     # (12 - 2 - 1) % 2 == 1


@pytest.mark.parametrize("where", ["conv", "pool"])
def test_a_misaligned_window_grid_is_not_folded(where, batch):
    torch.manual_seed(0)
    split = _unfolded_before(_Misaligned(where).eval(), batch[0],
                             "conv2(" if where == "conv" else "max_pool2d(")
    assert "conv_same(" in split.rotated.code


class _InPlace(nn.Module):
    def __init__(self, first: bool):
        super().__init__()
        self.first = first
        self.conv = nn.Conv2d(1, 2, 5)
        self.fc = nn.Linear(2 * 6 * 6, 5)

    def forward(self, x):
        if self.first:
            x = F.relu(x, inplace=True)      # on the input itself
        h = F.max_pool2d(self.conv(x), 4)
        return self.fc(F.relu(h, True).flatten(1))


@pytest.mark.parametrize("first", [True, False])
def test_in_place_ops_run_on_the_4b_batch_and_leave_the_input_alone(first, batch):
    torch.manual_seed(0)
    model = _InPlace(first).eval()
    x = batch[0] - 0.5
    before = x.clone()
    split = _build(model, x, layer="fc")
    if split.rotated is not None:
        assert "relu" not in split.rotated.code.split("unstack")[0]
        out = split.cut_rotated(x)
        torch.testing.assert_close(out[0], split.prefix(rotated_copies(x))[0])
    assert torch.equal(x, before)


class _Reads(nn.Module):
    """The batch size and a per-channel (not one-element) buffer: both need the 4B batch."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what
        self.register_buffer("gain", torch.linspace(0.5, 1.5, 2).view(1, 2, 1, 1))
        self.conv = nn.Conv2d(1, 2, 5)
        self.fc = nn.Linear(2 * 6 * 6, 5)

    def forward(self, x):
        h = F.max_pool2d(self.conv(x), 4)
        if self.what == "size":
            h = h + x.size(0) / 100
        else:
            h = h * self.gain
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("what", ["size", "gain"])
def test_what_the_fold_cannot_see_through_runs_on_the_4b_batch(what, batch):
    torch.manual_seed(0)
    _unfolded_before(_Reads(what).eval(), batch[0], "size(" if what == "size" else "* gain")


class _NormedConv(nn.Module):
    """Old-style weight_norm: a pre-hook sets conv.weight from weight_g/weight_v at every call;
    reading conv.weight directly would use the last call's weight and skip g and v."""

    def __init__(self):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.conv = torch.nn.utils.weight_norm(nn.Conv2d(1, 2, 5))
        self.fc = nn.Linear(2 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(F.max_pool2d(self.conv(x), 4).flatten(1))


class _GroupedFirst(nn.Module):
    """A grouped conv on the two-channel image: its rotated kernels cannot be stacked per group
    on the unrotated image (the groups would interleave rotations)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 5, groups=2)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(F.max_pool2d(self.conv(x * 2.0), 4).flatten(1))


def test_a_grouped_conv_on_the_image_is_not_folded(batch):
    torch.manual_seed(0)
    x = torch.cat([batch[0], batch[0].flip(-1)], 1)                 # (B, 2, 28, 28)
    _unfolded_before(_GroupedFirst().eval(), x, "conv(")


class _StdConv(nn.Conv2d):
    """A Conv2d subclass with its own forward (weight standardisation)."""

    def forward(self, x):
        w = (self.weight - self.weight.mean()) / (self.weight.std() + 1e-5)
        return F.conv2d(x, w, self.bias)


class _Odd(nn.Module):
    def __init__(self, what: str):
        super().__init__()
        self.what = what
        self.conv = _StdConv(1, 1, 5) if what == "subclass" else nn.Conv2d(1, 1, 5)
        self.fc = nn.Linear(6 * 6 if what == "subclass" else 12 * 24, 5)

    def forward(self, x):
        h = self.conv(x * 2.0)                                   # (1, 24, 24)
        if self.what == "subclass":
            return self.fc(F.max_pool2d(h, 4).flatten(1))
        return self.fc(F.max_pool2d(h, (2, 1)).flatten(1))       # not square


@pytest.mark.parametrize("what", ["subclass", "rectangular pool"])
def test_what_is_not_on_the_whitelist_is_not_folded(what, batch):
    torch.manual_seed(0)
    _unfolded_before(_Odd(what).eval(), batch[0],
                     "conv2d(" if what == "subclass" else "max_pool2d(")


def test_a_module_with_hooks_is_not_folded(batch):
    torch.manual_seed(0)
    model = _NormedConv().eval()
    with torch.no_grad():
        model(batch[0])  # conv.weight as the hook last set it: a leaf, so deepcopy works
    split = _build(model, batch[0], layer="fc")
    assert split is not None and split.rotated is None   # nothing around the conv folds


def test_big_maps_turned_back_into_4b_are_not_worth_folding(batch):
    """The seed CNN cut at conv2: the fold would end in 20x8x8 maps per image (more than the
    28x28 image), where turning them back costs what the fold saves; at fc2 it ends in 20x4x4."""
    x = batch[0]
    torch.manual_seed(0)
    model = build_model("seed_cnn").eval()
    assert _build(model, x, layer="conv2").rotated is None
    assert _build(model, x, layer="fc2").rotated is not None


def test_unstack_gradient_keeps_the_layout():
    v = torch.randn(2, 8, 4, 4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(unstack, (v,))
    cl = torch.randn(2, 8, 6, 6).to(memory_format=torch.channels_last).requires_grad_()
    out = unstack(cl)
    grad, = torch.autograd.grad(out, cl, torch.randn_like(out))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert grad.stride() == cl.stride()


def _ttt_pair(model_fn, **config):
    return engine_pair("ttt", model_fn, "fold_rotations", **config)


@pytest.mark.parametrize("channels_last", [True, False])
def test_ttt_adapts_the_same_with_the_fold(channels_last, batch):
    x = batch[0]
    folded, plain = _ttt_pair(lambda: build_model("seed_cnn").eval(),
                              channels_last=channels_last)
    a, b = folded.adapt(x, 3), plain.adapt(x, 3)
    assert folded._split._split.rotated is not None
    assert plain._split._split.rotated is None
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.losses, b.losses, rtol=1e-4, atol=1e-6)
    # online: the weights after the steps agree as well
    folded.adapt(x, 2, mode="online"), plain.adapt(x, 2, mode="online")
    for (n, p), (_, q) in zip(folded.adapted_parameters(), plain.adapted_parameters()):
        # (Adam divides by the gradient's size: where that is tiny, rounding moves a few
        # elements by ~1e-4; the logits agree as above)
        torch.testing.assert_close(p, q, rtol=1e-3, atol=3e-4, msg=n)


class _Global(nn.Module):
    """Any square size: a conv, then global average pooling."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.fc = nn.Linear(6, 8)
        self.out = nn.Linear(8, 5)

    def forward(self, x):
        h = F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1)
        return self.out(torch.relu(self.fc(h)))


def test_images_of_another_size_run_unfolded(batch):
    x = batch[0]
    folded, plain = _ttt_pair(lambda: _Global().eval(), layer="fc")
    for size in (28, 20, 28):
        xs = F.interpolate(x, size=size) if size != 28 else x
        torch.testing.assert_close(folded.adapt(xs, 2).logits, plain.adapt(xs, 2).logits,
                                   rtol=1e-4, atol=1e-5)
    split = folded._split._split
    assert split.rotated is not None and split.rotated_shape == (1, 28, 28)
    calls = []
    split.rotated.register_forward_hook(lambda *a: calls.append(1))
    folded.adapt(F.interpolate(x, size=20), 1)
    assert not calls          # 20x20: the unfolded prefix
    folded.adapt(x, 1)
    assert calls


def test_the_fold_is_off_when_asked_or_for_random_rotations():
    model = build_model("seed_cnn").eval()
    x0 = torch.zeros(1, 1, 28, 28)
    assert TTTEngine(copy.deepcopy(model), x0)._split.fold
    assert not TTTEngine(copy.deepcopy(model), x0, {"fold_rotations": False})._split.fold
    assert not TTTEngine(copy.deepcopy(model), x0, {"rotations": "rand"})._split.fold


# -- found by review (each test fails on c98e480) -------------------------------------------
class _Changeable(_Global):
    """A conv and a max-pool module whose attributes a user may change after the first adapt."""

    def __init__(self):
        super().__init__()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        h = F.adaptive_avg_pool2d(self.pool(torch.relu(self.conv(x))), 1).flatten(1)
        return self.out(torch.relu(self.fc(h)))


@pytest.mark.parametrize("change", [("conv", "padding", (0, 0)), ("conv", "stride", (2, 2)),
                                    ("conv", "padding_mode", "circular"),
                                    ("pool", "kernel_size", 3), ("pool", "stride", 3)])
def test_changing_a_folded_module_after_the_build_rebuilds_the_fold(change, batch):
    """The fold copies a conv's stride/padding into its own calls and checks pools' grids once:
    a changed attribute must rebuild it (the old fold gave rotation losses off by ~1e-2)."""
    x = batch[0]
    folded, plain = _ttt_pair(lambda: _Changeable().eval(), layer="fc")
    folded.adapt(x, 1), plain.adapt(x, 1)
    assert folded._split._split.rotated is not None
    name, attr, value = change
    for engine in (folded, plain):
        setattr(engine.model.get_submodule(name), attr, value)
    a, b = folded.adapt(x, 2), plain.adapt(x, 2)
    torch.testing.assert_close(a.losses, b.losses, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-5)


class _InPlace2(nn.Module):
    """A folded value h changed in place, directly or through an alias, and read afterwards: on
    images >= 0 the relu changes nothing (a check on them passes), on negative ones it does."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=how == "module")
        self.fc = nn.Linear(4, 8)
        self.out = nn.Linear(8, 5)
        with torch.no_grad():
            self.conv.weight.abs_()
            self.conv.bias.fill_(0.1)
        if how == "hook":
            self.act.register_forward_hook(lambda m, i, o: i[0].clamp_(max=0.5))  # changes h

    def forward(self, x):
        h = F.max_pool2d(self.conv(x), 4)       # (4, 7, 7)
        if self.how == "functional":
            F.relu(h, inplace=True)
        elif self.how == "positional":
            F.relu(h, True)
        elif self.how == "view":
            h[:, :2].relu_()
        elif self.how == "aten":
            torch.ops.aten.relu_.default(h[:, :2])
        elif self.how == "unused clamp":
            h.clamp_(min=0.2)
        else:                                   # an in-place module, a hook changing h
            self.act(h if self.how == "module" else h.view_as(h))
        return self.out(torch.relu(self.fc(F.adaptive_avg_pool2d(h * 2.0, 1).flatten(1))))


@pytest.mark.parametrize("how", ["functional", "positional", "view", "aten", "unused clamp",
                                 "module", "hook"])
def test_a_prefix_that_changes_tensors_in_place_is_not_folded(how, batch):
    """In-place ops on a folded value or on a view of it (review: folded values read unchanged
    afterwards, off by 0.1-0.7 on inputs the build check could not see)."""
    x = batch[0]
    torch.manual_seed(0)
    model = _InPlace2(how).eval()
    assert _build(model, x, layer="fc").rotated is None
    folded, plain = _ttt_pair(lambda: _InPlace2(how).eval(), layer="fc")
    folded.adapt(x, 1), plain.adapt(x, 1)                 # built on images >= 0
    torch.testing.assert_close(folded.adapt(-x, 2).logits, plain.adapt(-x, 2).logits)


class _Broadcast(nn.Module):
    """A one-channel "same" value (the image) against a stacked C-channel one."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 8)
        self.out = nn.Linear(8, 5)

    def forward(self, x):
        h = self.conv(x)
        h = x - h if self.how == "sub" else h / (1 + x.abs())
        h = F.adaptive_max_pool2d(-torch.relu(h), 1).flatten(1)
        return self.out(torch.relu(self.fc(h)))


@pytest.mark.parametrize("how", ["sub", "div"])
def test_a_one_channel_image_broadcasts_against_stacked_maps(how, batch):
    """The fold tried to repeat the 1-channel value to 4 channels (refused, with a warning and
    an FX traceback); now it broadcasts over every group; the pooling and neg fold too."""
    torch.manual_seed(0)
    code = _unfolded_before(_Broadcast(how).eval(), batch[0], "flatten(").rotated.code
    assert code.index("adaptive_max_pool2d(") < code.index("unstack(")  # 1x1 maps turned back


def test_a_scalar_buffer_given_per_channel_data_rebuilds_the_fold(batch):
    """`buf.data = ...` keeps the buffer object: the key now holds shapes and dtypes (review:
    the old fold still treated the normalisation's mean as a scalar, logits off by 0.46)."""
    x = batch[0]
    folded, plain = _ttt_pair(lambda: build_model("seed_cnn").eval())
    folded.adapt(x, 1), plain.adapt(x, 1)
    for engine in (folded, plain):
        engine.model.normalize.mean.data = torch.linspace(0.0, 0.3, 28).view(1, 1, 1, 28)
    torch.testing.assert_close(folded.adapt(x, 2).logits, plain.adapt(x, 2).logits,
                               rtol=1e-4, atol=1e-5)


class _Flags(nn.Module):
    """Positional True flags that are not `inplace`: count_include_pad, keepdim."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 7 * 7, 5)

    def forward(self, x):
        h = F.avg_pool2d(torch.relu(self.conv(x)), 4, 4, 0, False, True)   # (4, 7, 7)
        torch.sum(h, 1, True)                                              # unused
        return self.fc(h.flatten(1))


def test_positional_flags_that_are_not_inplace_do_not_stop_the_fold(batch):
    """Review: any positional True counted as in place, which refused the fold (38.6 -> 50 ms
    per adapt) and kept unused results in the split."""
    split = _build(_Flags().eval(), batch[0], layer="fc")
    assert split.rotated is not None and "sum" not in split.prefix.code
