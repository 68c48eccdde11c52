"""The torch.fx split IT3 uses to run the model's prefix once per step (engines/split.py)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine_helpers import engine_pair

from engines.hooks import add_to_output
from engines.split import LayerSplit
from pipeline.models import build_model


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("seed_rescnn").eval()


@pytest.mark.parametrize("layer", ["conv1", "conv2", "fc1", "fc2"])
@pytest.mark.parametrize("channel_delta", [True, False])
def test_split_equals_the_hooked_model(layer, channel_delta, batch):
    x = batch[0]
    model = _model()
    split = LayerSplit.build(model, layer, x[:4], channel_delta=channel_delta)
    assert split is not None
    with torch.no_grad():
        cut = split.cut(x)
        delta = torch.randn(x.shape[0], cut[0].shape[1])
        with add_to_output(model.get_submodule(layer), delta):
            hooked = model(x)
        assert torch.equal(split.run(cut, None), model(x))
        assert torch.equal(split.run(cut, delta), hooked)
    # a per-channel shift moves past the max-pool right after a conv; fc2 feeds a skip
    # connection, so the rest needs fc2's input as well as its output
    moved = channel_delta and layer.startswith("conv")
    assert (split.injection != layer) == moved
    assert len(cut) == (2 if layer == "fc2" else 1)


class _Tiny(nn.Module):
    """conv1 (1 -> 4 channels, 5x5) then fc (the flattened 4x24x24 maps -> 10): most test models
    below differ only in their forward and a few attributes."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 5)
        self.fc = nn.Linear(4 * 24 * 24, 10)


class _Branchy(_Tiny):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x):
        h = self.conv1(x)
        if h.mean() > 0:
            h = h * 2
        return self.fc(h.flatten(1))


class _Dropout(_Tiny):
    """Dropout before the injection layer: in train mode each pass must draw its own mask."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.fc(self.conv1(self.drop(x)).flatten(1))


def _engines(model_fn, **config):
    """Two IT3 engines on identical models, sharing the prefix or not."""
    return engine_pair("it3", model_fn, "split_model", **config)


def test_untraceable_model_falls_back_to_full_forwards(batch):
    x = batch[0]
    with pytest.warns(RuntimeWarning, match="cannot split _Branchy at 'conv1' .*torch.fx"):
        assert LayerSplit.build(_Branchy().eval(), "conv1", x[:4], channel_delta=True) is None
    shared, full = _engines(lambda: _Branchy().eval(), layer="conv1")
    with pytest.warns(RuntimeWarning, match="running whole forwards"):
        a = shared.adapt(x, 2)
    assert torch.equal(a.logits, full.adapt(x, 2).logits)


@pytest.mark.parametrize("config", [
    {"variant": "paper"},                                      # the defaults: fc1, js
    {"variant": "paper", "layer": "conv1", "adapt_params": "all"},
    {"variant": "paper", "layer": "conv2", "embedder": "full", "mode": "online"},
    {"variant": "torch_ttt", "layer": "conv1", "distance": "mse", "lr": 1e-3},
    {"variant": "torch_ttt", "layer": "fc2", "detach_target": True},
])
def test_sharing_the_prefix_gives_the_same_adaptation(config, batch):
    x = batch[0]
    shared, full = _engines(_model, **config)
    for xb in (x[:6], x[6:]):  # a second batch: the anchor's prefix must be the new batch's
        a, b = shared.adapt(xb, 3), full.adapt(xb, 3)
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.losses, b.losses, rtol=1e-4, atol=1e-7)
    assert shared._split._split is not None     # the split was used, not the fallback
    for (n, p), (_, q) in zip(shared.state_dict().items(), full.state_dict().items()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)


def test_train_mode_runs_full_forwards(batch):
    x = batch[0]
    shared, full = _engines(lambda: _Dropout().train(), layer="conv1")
    torch.manual_seed(1)
    a = shared.adapt(x, 2)
    torch.manual_seed(1)
    b = full.adapt(x, 2)
    assert torch.equal(a.logits, b.logits)
    assert shared._split.get(shared.model, "conv1", x) is None


def test_split_stays_out_of_state_dict_and_copies_and_follows_new_tensors(batch):
    x = batch[0]
    shared, full = _engines(_model)
    shared.adapt(x, 1)
    assert list(shared.state_dict()) == list(full.state_dict())
    twin = copy.deepcopy(shared)
    assert torch.equal(twin.adapt(x, 2).logits, shared.adapt(x, 2).logits)
    for engine in (shared, full):  # new buffer objects (as `.to(device)` makes): rebuild
        engine.model.normalize.mean = torch.tensor(0.5)
        engine.to(torch.float64)
    torch.testing.assert_close(shared.adapt(x.double(), 2).logits,
                               full.adapt(x.double(), 2).logits)


class _Blocks(nn.Module):
    """A container layer, then an in-place ReLU on its output."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 5), nn.MaxPool2d(2))
        self.relu = nn.ReLU(inplace=inplace)
        self.fc = nn.Linear(4 * 12 * 12, 10)

    def forward(self, x):
        return self.fc(self.relu(self.features(x)).flatten(1))


class _Sized(_Tiny):
    """The rest reads a non-tensor value of the prefix: the batch size."""

    def forward(self, x):
        return self.fc(self.conv1(x).view(x.size(0), -1))


@pytest.mark.parametrize("variant", ["paper", "torch_ttt"])
def test_non_tensor_cut_values(variant, batch):
    x = batch[0]
    shared, full = _engines(lambda: _Sized().eval(), layer="conv1", variant=variant,
                            channels_last=False)  # view() needs the default layout
    torch.testing.assert_close(shared.adapt(x, 2).logits, full.adapt(x, 2).logits)
    assert shared._split._split is not None


@pytest.mark.parametrize("inplace", [False, True])
def test_container_layer_and_in_place_ops(inplace, batch):
    x = batch[0]
    torch.manual_seed(0)
    model = _Blocks(inplace).eval()
    # an in-place op on the layer's output would let one pass change the other's input: the
    # rest then gets its own copy of the cut values at every run
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        split = LayerSplit.build(model, "features", x[:4], channel_delta=True)
    assert split is not None and split.fresh_cut == inplace
    shared, full = _engines(lambda: _Blocks(inplace).eval(), layer="features",
                            variant="torch_ttt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        torch.testing.assert_close(shared.adapt(x, 2).logits, full.adapt(x, 2).logits)


def _ttt_engines(model_fn, **config):
    return engine_pair("ttt", model_fn, "split_model", **config)


@pytest.mark.parametrize("layer", ["fc2", "fc1", "conv2"])
def test_ttt_runs_the_rest_on_the_unrotated_quarter_only(layer, batch):
    x = batch[0]
    split, whole = _ttt_engines(lambda: build_model("seed_cnn").eval(), layer=layer)
    a, b = split.adapt(x, 3), whole.adapt(x, 3)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.losses, b.losses, rtol=1e-4, atol=1e-6)
    assert split._split._split is not None
    rows = []  # the layer after `layer` sees 4B rows with the whole model, B with the split
    after = split.model.get_submodule({"fc2": "fc3", "fc1": "fc2", "conv2": "fc1"}[layer])
    # a global hook: a hook on the module would make the split treat it as changing its input
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, inp, _o: rows.append(inp[0].shape[0]) if m is after else None)
    try:
        split.adapt(x, 1)
    finally:
        handle.remove()
    assert rows == [len(x), len(x)]   # step 1's quarter, then the final prediction


def test_ttt_falls_back_when_the_rest_reads_the_batch_size(batch):
    x = batch[0]
    with pytest.warns(RuntimeWarning, match="subset of the rows"):
        split, whole = _ttt_engines(lambda: _Sized().eval(), layer="conv1", channels_last=False)
        a = split.adapt(x, 2)
    assert torch.equal(a.logits, whole.adapt(x, 2).logits)


class _Gain(nn.Module):
    """A weight-derived value computed before the layer and read after it (not batch rows)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 5)
        self.gain = nn.Parameter(torch.zeros(50))
        self.fc1 = nn.Linear(4 * 24 * 24, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x):
        scale = self.gain.exp()                                        # (50,)
        return self.fc2(self.fc1(self.conv1(x).flatten(1)) * scale)


def test_ttt_slices_only_the_batch_rows_of_the_cut(batch):
    x = batch[0]
    split, whole = _ttt_engines(lambda: _Gain().eval(), layer="conv1")
    a, b = split.adapt(x, 2), whole.adapt(x, 2)
    assert split._split._split is not None
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-5)


# --- regressions found in review: each model made the split differ from whole forwards ---

class _RawHead(nn.Module):
    """A parameter read directly after the layer (hand-written linear): recomputed in the
    rest, so IT3's frozen anchor replaces it too."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 5)
        self.fc1 = nn.Linear(4 * 24 * 24, 32)
        self.weight = nn.Parameter(torch.randn(10, 32) * 0.1)
        self.bias = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        h = torch.relu(self.fc1(torch.relu(self.conv1(x)).flatten(1)))
        return torch.nn.functional.linear(h, self.weight, self.bias)


class _Tied(nn.Module):
    """`b` shares `a`'s weights; the layer is `a`: the anchor must reach `b` too."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 5)
        self.fc1 = nn.Linear(4 * 24 * 24, 32)
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32)
        self.b.weight = self.a.weight
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.a(torch.relu(self.fc1(torch.relu(self.conv1(x)).flatten(1)))))
        return self.fc(torch.relu(self.b(h)))


@pytest.mark.parametrize("model_fn, layer", [(_RawHead, "fc1"), (_Tied, "a")])
def test_it3_anchor_reaches_every_weight_after_the_layer(model_fn, layer, batch):
    x = batch[0]
    shared, full = _engines(lambda: model_fn().eval(), layer=layer, lr=1e-2)
    a, b = shared.adapt(x, 4), full.adapt(x, 4)
    assert shared._split._split is not None
    torch.testing.assert_close(a.losses, b.losses, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-5)


class _RowMixing(_Tiny):
    """Batch statistics after the layer, even in eval mode: the unrotated quarter alone would
    be normalised over other rows than the whole 4B batch."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        return self.fc(self.norm(torch.relu(self.conv1(x))).flatten(1))


class _ReadsBatch(_Tiny):
    """Reads the batch size after the layer, and the first batch has one image."""

    def forward(self, x):
        b = x.shape[0]
        return self.fc(torch.relu(self.conv1(x)).reshape(b, -1))


@pytest.mark.parametrize("model_fn, first", [(_RowMixing, 12), (_ReadsBatch, 1)])
def test_ttt_refuses_a_rest_that_cannot_run_on_a_quarter(model_fn, first, batch):
    x = batch[0]
    split, whole = _ttt_engines(lambda: model_fn().eval(), layer="conv1")
    with pytest.warns(RuntimeWarning, match="subset of the rows"):
        split.adapt(x[:first], 2)
    for xb in (x[:first], x):
        assert torch.equal(split.adapt(xb, 2).logits, whole.adapt(xb, 2).logits)


class _Temperature(_Tiny):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()
        self.temperature = 1.0

    def forward(self, x):
        return self.fc(self.act(self.conv1(x)).flatten(1)) / self.temperature


@pytest.mark.parametrize("change", ["module", "hook", "attribute"])
def test_split_follows_changes_to_the_model(change, batch):
    x = batch[0]
    engines_ = [*_engines(lambda: _Temperature().eval(), layer="conv1"),
                *_ttt_engines(lambda: _Temperature().eval(), layer="conv1")]
    for engine in engines_:
        engine.adapt(x, 1)  # builds the split
        model = engine.model
        if change == "module":
            model.act = nn.Tanh().eval()
        elif change == "hook":
            model.register_forward_hook(lambda _m, _i, out: out / 2)
        else:
            model.temperature = 4.0  # torch.fx traced it as a constant
    for shared, full in (engines_[:2], engines_[2:]):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            a = shared.adapt(x, 2)
        torch.testing.assert_close(a.logits, full.adapt(x, 2).logits, rtol=1e-4, atol=1e-5)
        # a hook on the model itself: the split never calls the model as a whole, so it is off
        assert any("forward hooks on the model itself" in str(w.message)
                   for w in seen) == (change == "hook")


class _BatchSizedConstant(nn.Module):
    """A value built from x (its device) before the layer, read after it; its length equals
    4B for B = 16, which must not make it look like the batch's rows."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 5)
        self.fc1 = nn.Linear(4 * 24 * 24, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        scale = torch.linspace(0.5, 1.5, 64, device=x.device)
        h = torch.relu(self.conv1(x)).flatten(1)
        return self.fc2(self.fc1(h) * scale)


def test_ttt_rows_are_found_from_the_graph_not_by_size():
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    split, whole = _ttt_engines(lambda: _BatchSizedConstant().eval(), layer="conv1")
    for xb in (x[:2], x):
        torch.testing.assert_close(split.adapt(xb, 2).logits, whole.adapt(xb, 2).logits,
                                   rtol=1e-4, atol=1e-5)


class _Blocky(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(1, 4, 5), nn.ReLU())
        self.fc1 = nn.Linear(4 * 24 * 24, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.block(x).flatten(1))))


def test_hooks_the_split_cannot_honour_turn_it_off(batch):
    x = batch[0]
    shared, full = _engines(lambda: _Blocky().eval(), layer="fc1", variant="torch_ttt")
    for engine in (shared, full):  # halves the gradient flowing into the conv block
        engine.model.block.register_full_backward_pre_hook(lambda _m, g: (g[0] / 2,))
    with pytest.warns(RuntimeWarning, match="backward hooks on block"):
        a = shared.adapt(x, 2)
    torch.testing.assert_close(a.logits, full.adapt(x, 2).logits)
    # a forward hook on a container keeps it one call, so the hook still runs
    split, whole = _ttt_engines(lambda: _Blocky().eval(), layer="fc1")
    for engine in (split, whole):
        engine.model.block.register_forward_hook(lambda _m, _i, out: out * 2)
    torch.testing.assert_close(split.adapt(x, 2).logits, whole.adapt(x, 2).logits,
                               rtol=1e-4, atol=1e-5)
    assert split._split._split is not None


class _Attrs(_Tiny):
    """Attributes torch.fx bakes into the graph: a non-buffer tensor, a list, a function."""

    def __init__(self):
        super().__init__()
        self.t = torch.tensor(1.0)
        self.scale = [1.0]
        self.fn = torch.relu

    def forward(self, x):
        return self.fc(self.fn(self.conv1(x)).flatten(1)) * self.scale[0] / self.t


@pytest.mark.parametrize("name, value", [("t", torch.tensor(3.0)), ("scale", [3.0]),
                                         ("fn", torch.tanh)])
def test_split_follows_any_public_attribute(name, value, batch):
    x = batch[0]
    pairs = (_engines(lambda: _Attrs().eval(), layer="conv1"),
             _ttt_engines(lambda: _Attrs().eval(), layer="conv1"))
    for shared, full in pairs:
        for engine in (shared, full):
            engine.adapt(x, 1)  # builds the split
            setattr(engine.model, name, value)
        torch.testing.assert_close(shared.adapt(x, 2).logits, full.adapt(x, 2).logits,
                                   rtol=1e-4, atol=1e-5)
        assert shared._split._split is not None


class _SideEffects(_Tiny):
    """Sets its own attributes in forward: a traced graph would not replay that."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        self.features = torch.relu(self.conv1(x)).flatten(1)
        return self.fc(self.features)


@pytest.mark.parametrize("make", ["it3", "ttt"])
def test_a_model_with_side_effects_runs_whole_forwards(make, batch):
    x = batch[0]
    pair = (_engines if make == "it3" else _ttt_engines)(
        lambda: _SideEffects().eval(), layer="conv1")
    shared, full = pair
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        a = [shared.adapt(x, 2) for _ in range(2)]
    assert sum("changes its own state" in str(w.message) for w in seen) == 1  # once
    b = [full.adapt(x, 2) for _ in range(2)]
    assert torch.equal(a[1].logits, b[1].logits)
    assert isinstance(shared.model.features, torch.Tensor)   # no tracing proxy left behind
    assert shared.model.calls == full.model.calls


class _History(_Tiny):
    """Appends to a list attribute in forward (in place: the list object stays the same)."""

    def __init__(self):
        super().__init__()
        self.history: list = []

    def forward(self, x):
        h = torch.relu(self.conv1(x)).flatten(1)
        self.history.append(h.shape[0])
        return self.fc(h)


def test_in_place_side_effects_are_seen_and_the_model_left_alone(batch):
    x = batch[0]
    shared, full = _engines(lambda: _History().eval(), layer="conv1")
    with pytest.warns(RuntimeWarning, match="changes its own state"):
        a = shared.adapt(x, 2)
    assert torch.equal(a.logits, full.adapt(x, 2).logits)
    assert all(isinstance(n, int) for n in shared.model.history)   # no proxy left behind
    assert shared.model.history == full.model.history             # nor extra entries


class _Config:
    scale = 1.0


class _Hidden(_Tiny):
    """State torch.fx bakes into the graph, out of sight of public attributes: a private
    float behind a property, and a plain config object."""

    def __init__(self):
        super().__init__()
        self._temp = 1.0
        self.cfg = _Config()

    @property
    def temperature(self) -> float:
        return self._temp

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temp = value

    def forward(self, x):
        h = torch.relu(self.conv1(x)).flatten(1)
        return self.fc(h) * self.cfg.scale / self.temperature


@pytest.mark.parametrize("change", ["property", "config"])
def test_split_follows_private_and_nested_state(change, batch):
    x = batch[0]
    for shared, full in (_engines(lambda: _Hidden().eval(), layer="conv1"),
                         _ttt_engines(lambda: _Hidden().eval(), layer="conv1")):
        for engine in (shared, full):
            engine.adapt(x, 1)
            if change == "property":
                engine.model.temperature = 5.0
            else:
                engine.model.cfg.scale = 5.0
        torch.testing.assert_close(shared.adapt(x, 2).logits, full.adapt(x, 2).logits,
                                   rtol=1e-4, atol=1e-5)


class _Counters(_Tiny):
    """Side effects out of sight of a shallow look: a list inside a dict, a field of a plain
    object, a buffer counted up in place."""

    def __init__(self):
        super().__init__()
        self.log = {"rows": []}
        self.stats = _Config()
        self.stats.calls = 0
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        h = torch.relu(self.conv1(x)).flatten(1)
        self.log["rows"].append(h.shape[0])
        self.stats.calls += 1
        self.calls.add_(1)
        return self.fc(h)


def test_deep_side_effects_are_seen_and_the_model_left_alone(batch):
    x = batch[0]
    for shared, full in (_engines(lambda: _Counters().eval(), layer="conv1"),
                         _ttt_engines(lambda: _Counters().eval(), layer="conv1")):
        with pytest.warns(RuntimeWarning, match="changes its own state"):
            a = shared.adapt(x, 2)
        torch.testing.assert_close(a.logits, full.adapt(x, 2).logits)
        s, f = shared.model, full.model
        assert s.log == f.log and s.stats.calls == f.stats.calls and s.calls == f.calls


class _Constant(_Tiny):
    """A tensor torch.fx cannot name (inside a list): the tracer stores it on the traced root."""

    def __init__(self):
        super().__init__()
        self.shift = [torch.tensor(0.5)]

    def forward(self, x):
        return self.fc(torch.relu(self.conv1(x)).flatten(1) + self.shift[0])


def test_tracing_leaves_nothing_on_the_model(batch):
    x = batch[0]
    shared, full = _engines(lambda: _Constant().eval(), layer="conv1")
    torch.testing.assert_close(shared.adapt(x, 2).logits, full.adapt(x, 2).logits)
    assert shared._split._split is not None
    assert sorted(vars(shared.model)) == sorted(vars(full.model))


class _Twice(_Tiny):
    """Runs the layer twice while a flag is set."""

    def __init__(self):
        super().__init__()
        self.twice = True

    def forward(self, x):
        h = self.conv1(x)
        if self.twice:
            h = h + self.conv1(x)
        return self.fc(torch.relu(h).flatten(1))


def test_a_refused_model_is_split_once_it_allows_it(batch):
    x = batch[0]
    shared, _ = _engines(lambda: _Twice().eval(), layer="conv1")
    with pytest.warns(RuntimeWarning, match="runs 2 times"):
        shared.adapt(x, 1)
    shared.model.twice = False
    shared.adapt(x, 1)
    assert shared._split._split is not None


def test_step_loss_outside_adapt_runs_whole_forwards(batch):
    x = batch[0]
    shared, full = _engines(_model)
    shared.adapt(x[:6], 2), full.adapt(x[:6], 2)
    a, b = shared._step_loss(x[6:9])[1], full._step_loss(x[6:9])[1]   # another batch and size
    torch.testing.assert_close(a, b)


class _Kept(nn.Module):
    """Keeps a tensor in a list (not a buffer) and a module under two names."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 5)
        self.fc1 = nn.Linear(4 * 24 * 24, 32)
        self.alias = self.fc1
        self.fc = nn.Linear(32, 10)
        self.shift = [torch.zeros(32)]

    def forward(self, x):
        return self.fc(torch.relu(self.alias(torch.relu(self.conv1(x)).flatten(1))
                                  + self.shift[0]))


def test_split_reads_the_models_own_tensors_and_aliases_work(batch):
    x = batch[0]
    for shared, full in (_engines(lambda: _Kept().eval(), layer="conv1"),
                         _ttt_engines(lambda: _Kept().eval(), layer="conv1")):
        for _ in range(2):  # the second adapt: IT3's anchor under both names of fc1
            torch.testing.assert_close(shared.adapt(x, 2).logits, full.adapt(x, 2).logits,
                                       rtol=1e-4, atol=1e-5)
        for engine in (shared, full):
            engine.model.shift[0].fill_(0.5)   # changed in place: no new key, same tensor
        torch.testing.assert_close(shared.adapt(x, 2).logits, full.adapt(x, 2).logits,
                                   rtol=1e-4, atol=1e-5)


class _Seen(_Tiny):
    """A counter on the class: forward's result depends on it."""

    seen = 0

    def forward(self, x):
        type(self).seen += 1
        return self.fc(torch.relu(self.conv1(x)).flatten(1)) * (1.0 if self.seen < 6 else 0.5)


def test_class_state_changed_in_forward_is_a_side_effect(batch):
    x = batch[0]
    _Seen.seen = 0
    shared, _ = _engines(lambda: _Seen().eval(), layer="conv1", channels_last=False)
    with pytest.warns(RuntimeWarning, match="changes its own state"):
        shared.adapt(x, 1)
    assert shared._split._split is None


class _OldWeightNorm(nn.Module):
    """torch.nn.utils.weight_norm (deprecated API): its hook sets conv1.weight at every call."""

    def __init__(self):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.conv1 = torch.nn.utils.weight_norm(nn.Conv2d(1, 4, 5))
        self.fc = nn.Linear(4 * 24 * 24, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv1(x)).flatten(1))


def test_a_leaf_that_sets_its_own_attributes_keeps_the_split(batch):
    x = batch[0]
    split, whole = _ttt_engines(lambda: _OldWeightNorm().eval(), layer="fc")
    first = None
    for _ in range(3):
        torch.testing.assert_close(split.adapt(x, 1).logits, whole.adapt(x, 1).logits,
                                   rtol=1e-4, atol=1e-5)
        first = first or split._split._split
        assert split._split._split is first   # built once, not at every call


class _Clip(nn.Module):
    """An in-place clip whose result is unused: torch.fx's dead-code pass counted it as dead, so
    the split dropped it (no change on images in [0, 1], where the split is checked)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 5)
        self.conv2 = nn.Conv2d(8, 8, 5)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        h = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        h.clamp_(max=1.0)
        h = F.max_pool2d(torch.relu(self.conv2(h)), 2)
        out = self.fc2(torch.relu(self.fc1(h.flatten(1))))
        out.clamp_(min=-3.0)           # after the layer: in the rest
        return out


@pytest.mark.parametrize("make", ["it3", "ttt"])
def test_an_in_place_op_with_an_unused_result_stays_in_the_split(make, batch):
    x = batch[0]
    pair = (_engines if make == "it3" else _ttt_engines)(lambda: _Clip().eval(), layer="fc1")
    for engine in pair:
        engine.adapt(x, 1)                            # built and checked on images in [0, 1]
    split = pair[0]._split._split
    # the rest's clamp_ changes a tensor of its own (fc2's output), not the cut: TTT keeps
    # its split, IT3 its shared cut values
    assert split is not None and "clamp_" in split.prefix.code and "clamp_" in split.suffix.code
    assert not split.fresh_cut
    a, b = (engine.adapt(x * 8, 2) for engine in pair)  # was off by 1.3 (TTT), 0.2 (IT3)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-5)


class _ClipAfter(nn.Module):
    """An in-place op after the layer on a value from before it, whose result is unused: kept in
    the prefix it would run before the rest reads that value."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 7 * 7, 10)

    def forward(self, x):
        h0 = F.max_pool2d(self.conv0(x), 4)
        z = torch.relu(self.conv1(h0 * 1.0)) + h0
        h0.clamp_(max=1.0)
        return self.fc(z.flatten(1))


@pytest.mark.parametrize("make", ["it3", "ttt"])
def test_an_in_place_op_after_the_layer_on_an_earlier_value_refuses_the_split(make, batch):
    x = batch[0] * 0.2                                    # the clip changes nothing here
    pair = (_engines if make == "it3" else _ttt_engines)(
        lambda: _ClipAfter().eval(), layer="conv1",
        **({"variant": "torch_ttt"} if make == "it3" else {}))
    with pytest.warns(RuntimeWarning, match="in-place op after the layer"):
        pair[0].adapt(x, 1)
    pair[1].adapt(x, 1)
    a, b = (engine.adapt(x * 40, 2) for engine in pair)   # was off by 1.6 (TTT), 6.3 (IT3)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-5)


class _Mutating(nn.Module):
    """In-place changes around the cut that only act on bright images (the split is checked on
    dim ones): on the input, on a view of a value from before the layer, on the layer's output,
    or through `.data`."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.conv0 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 14 * 14, 10)

    def forward(self, x):
        if self.kind == "input":
            x += (x > 1).float()
        h0 = self.conv0(x) + 0.0
        if self.kind == "data":
            h0.data = h0.data.clamp(max=1.0)
        v = h0.flatten(1)                          # a cut value viewing another
        y = self.conv1(h0 * 1.0)
        if self.kind == "view of earlier":
            a = h0.view_as(y)
            a.mul_(torch.where(a > 1, 2.0, 1.0))
        if self.kind == "layer output":
            y.clamp_(max=0.3)
        if self.kind == "dropout alias":           # eval dropout returns its input
            F.dropout(y, 0.5, training=False).mul_(torch.where(y > 1, 2.0, 1.0))
        if self.kind == "keyword view":
            torch.transpose(input=y, dim0=2, dim1=3).clamp_(max=0.3)
        if self.kind == "foreach":
            torch._foreach_mul_([y], [torch.where(y > 1, 2.0, 1.0)])
        z = torch.relu(y) + h0
        if self.kind == "view of earlier":               # the rest reads v after the change
            z = (z.flatten(1) + v).view_as(z)
        return self.fc(F.max_pool2d(z, 2).flatten(1))


@pytest.mark.parametrize("kind", ["input", "view of earlier", "layer output", "data",
                                  "dropout alias", "keyword view", "foreach"])
@pytest.mark.parametrize("make", ["it3", "it3 paper", "ttt"])
def test_in_place_changes_around_the_cut_match_whole_forwards(kind, make, batch):
    """Review: IT3's second pass read the first pass's change to a shared cut value (off by
    0.45, paper variant's anchor 1.7), TTT's head read rows the rest had changed (0.1),
    `h.data = ...` never entered the graph (1.8-4.5), the build checks changed the caller's
    batch through a model that adds to its input (0.08), a list of aliasing ops missed eval
    dropout, keyword arguments and _foreach ops (0.2), and a copied cut value no longer
    viewed the copy of the value it viewed (2.7). Now the rest is run once on the check batch
    and torch's version counters (shared by views) show whether it changes a cut value."""
    if kind == "input" and make != "ttt":
        pytest.skip("IT3's own autograd refuses a model that changes its input in place")
    torch.manual_seed(1)
    dim, bright = batch[0] * 0.05, torch.rand(8, 1, 28, 28) * 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # a refused split says why
        pair = (_engines if make != "ttt" else _ttt_engines)(
            lambda: _Mutating(kind).eval(), layer="conv1",
            **({"variant": "torch_ttt"} if make == "it3" else {}))
        for inputs in ((bright, dim) if kind == "input" else (dim, bright)):
            xs = [inputs.clone(), inputs.clone()]
            a, b = (engine.adapt(xi, 2) for engine, xi in zip(pair, xs))
            # IT3's shared prefix sums both passes' gradients in another order: on these large
            # activations Adam's normalised step turns that rounding into up to ~2e-3 by step 2
            torch.testing.assert_close(a.logits[:2], b.logits[:2], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(a.logits, b.logits, rtol=1e-2, atol=1e-2)
            torch.testing.assert_close(xs[0], xs[1])      # the caller's batch alike
