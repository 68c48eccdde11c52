"""The model zoo: the seeds' architectures exactly (bit-identical at 1x28x28), any C x H x W,
normalisation inside, kwargs for a dataset, errors by name."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import TTTPipeError
from pipeline.models import build_model, default_layer, list_models, model_kwargs_for

SEEDS = ("seed_cnn", "seed_rescnn", "seed_cnn_bn")


@dataclass(frozen=True, kw_only=True)
class Spec:  # the DatasetSpec interface model_kwargs_for reads
    name: str
    num_classes: int
    image_shape: tuple
    mean: object
    std: object


def _shapes(model) -> dict[str, tuple]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def test_seed_cnn_is_the_ttt_tutorials_net():
    assert _shapes(build_model("seed_cnn")) == {
        "conv1.weight": (10, 1, 5, 5), "conv1.bias": (10,),
        "conv2.weight": (20, 10, 5, 5), "conv2.bias": (20,),
        "fc1.weight": (50, 320), "fc1.bias": (50,),
        "fc2.weight": (50, 50), "fc2.bias": (50,),
        "fc3.weight": (10, 50), "fc3.bias": (10,)}


def test_seed_rescnn_is_the_it3_tutorials_net_with_residual_adds():
    model = build_model("seed_rescnn")
    assert _shapes(model)["fc3.weight"] == (50, 50) and _shapes(model)["fc4.weight"] == (10, 50)
    x = torch.rand(3, 1, 28, 28)
    h = model.features(x)
    h2 = model.activation(model.fc2(h)) + h
    h3 = model.activation(model.fc3(h2)) + h2
    torch.testing.assert_close(model(x), model.fc4(h3))


def _seed_reference(model, x, mean, std):
    """The original 28x28-only code's forward (scalar 0-dim normalisation), op for op."""
    act = F.leaky_relu
    x = (x - torch.tensor(float(mean))) / torch.tensor(float(std))
    x = act(F.max_pool2d(F.conv2d(x, model.conv1.weight, model.conv1.bias), 2))
    x = act(F.max_pool2d(F.conv2d(x, model.conv2.weight, model.conv2.bias), 2))
    x = act(F.linear(x.flatten(1), model.fc1.weight, model.fc1.bias))
    if hasattr(model, "fc4"):
        x = act(F.linear(x, model.fc2.weight, model.fc2.bias)) + x
        x = act(F.linear(x, model.fc3.weight, model.fc3.bias)) + x
        return F.linear(x, model.fc4.weight, model.fc4.bias)
    x = act(F.linear(x, model.fc2.weight, model.fc2.bias))
    return F.linear(x, model.fc3.weight, model.fc3.bias)


@pytest.mark.parametrize("name", ["seed_cnn", "seed_rescnn"])
@pytest.mark.parametrize("kwargs", [{}, {"mean": (0.286,), "std": [0.353]},
                                    {"mean": 0.286, "std": 0.353, "in_channels": 1, "image_size": [28, 28]}])
def test_seed_nets_at_1x28x28_are_bit_identical_to_the_original(name, kwargs):
    torch.manual_seed(0)
    model = build_model(name, **kwargs)
    assert model.normalize.mean.dim() == 0 and model.normalize.std.dim() == 0
    x = torch.rand(5, 1, 28, 28)
    mean, std = kwargs.get("mean", 0.1307), kwargs.get("std", 0.3081)
    mean, std = (v if isinstance(v, float) else v[0] for v in (mean, std))
    assert torch.equal(model(x), _seed_reference(model, x, mean, std))


def test_same_seed_same_initial_weights_as_before():
    # The 28x28 nets draw their parameters in the same order as before: same init per seed.
    torch.manual_seed(3)
    a = build_model("seed_cnn").state_dict()
    torch.manual_seed(3)
    b = build_model("seed_cnn", in_channels=1, image_size=(28, 28)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", SEEDS)
def test_seed_nets_take_rgb_of_other_sizes_with_per_channel_normalisation(name):
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    model = build_model(name, mean=mean, std=std, in_channels=3, image_size=(32, 40), num_classes=7)
    assert model.fc1.in_features == 20 * 5 * 7
    assert tuple(model.normalize.mean.shape) == (1, 3, 1, 1)
    x = torch.rand(2, 3, 32, 40)
    want = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalize(x), want)
    assert model.eval()(x).shape == (2, 7)


@pytest.mark.parametrize("name", SEEDS)
def test_models_normalise_their_own_pixel_unit_input(name):
    torch.manual_seed(0)
    model = build_model(name, mean=0.5, std=0.25)
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(model.normalize(x), (x - 0.5) / 0.25)
    assert model(x).shape == (4, 10)
    assert "normalize.mean" not in model.state_dict()  # not a weight: the manifest carries it


def test_seed_cnn_bn_has_batchnorm_after_each_conv():
    model = build_model("seed_cnn_bn")
    assert isinstance(model.bn1, torch.nn.BatchNorm2d) and model.bn1.num_features == 10
    assert isinstance(model.bn2, torch.nn.BatchNorm2d) and model.bn2.num_features == 20


def test_model_kwargs_for_a_dataset_spec():
    gray = Spec(name="fashion-mnist", num_classes=10, image_shape=(1, 28, 28), mean=(0.286,), std=(0.353,))
    assert model_kwargs_for("seed_cnn", gray) == {
        "mean": 0.286, "std": 0.353, "num_classes": 10, "in_channels": 1, "image_size": [28, 28]}
    old = Spec(name="mnist", num_classes=10, image_shape=(1, 28, 28), mean=0.1307, std=0.3081)  # floats
    assert model_kwargs_for("seed_rescnn", old)["mean"] == 0.1307
    none = model_kwargs_for("seed_cnn", gray, normalize="none")
    assert (none["mean"], none["std"]) == (0.0, 1.0)
    rgb = Spec(name="cifar10", num_classes=10, image_shape=(3, 32, 32),
               mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    kw = model_kwargs_for("seed_cnn", rgb)
    assert kw["mean"] == [0.49, 0.48, 0.45] and kw["in_channels"] == 3 and kw["image_size"] == [32, 32]
    assert build_model("seed_cnn", **kw)(torch.rand(1, 3, 32, 32)).shape == (1, 10)
    assert model_kwargs_for("seed_cnn", rgb, normalize="imagenet")["std"] == [0.229, 0.224, 0.225]
    assert model_kwargs_for("seed_cnn", rgb, normalize="0.5,0.25")["mean"] == 0.5
    with pytest.raises(TTTPipeError, match="3 mean values for 1-channel"):
        model_kwargs_for("seed_cnn", gray, normalize="imagenet")
    with pytest.raises(TTTPipeError, match="bad --normalize"):
        model_kwargs_for("seed_cnn", gray, normalize="datset")


def test_default_layers_exist_for_every_zoo_model_and_method():
    for name in list_models():
        for method in ("ttt", "it3"):
            assert default_layer(name, method), (name, method)
    assert default_layer("seed_cnn", "ttt") == "fc2" and default_layer("seed_rescnn", "it3") == "fc1"
    assert default_layer("mypkg.nets:make", "ttt") is None


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(TTTPipeError, match="seed_cnn, seed_cnn_bn, seed_rescnn"):
        build_model("resnet51")


def test_bad_values_are_refused_in_one_line():
    with pytest.raises(TTTPipeError, match="std"):
        build_model("seed_cnn", std=0.0)
    with pytest.raises(TTTPipeError, match="at least 16x16"):
        build_model("seed_cnn", image_size=(12, 28))
    with pytest.raises(TTTPipeError, match="2 values per statistic but the model takes 1"):
        build_model("seed_cnn", mean=[0.1, 0.2], std=[0.3, 0.3])
    with pytest.raises(TTTPipeError, match="unexpected keyword"):
        build_model("seed_cnn", colour=True)
