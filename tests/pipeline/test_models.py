"""The model zoo: the seeds' architectures exactly, normalisation inside, errors by name."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import TTTPipeError
from pipeline.models import build_model, list_models


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


@pytest.mark.parametrize("name", list_models())
def test_models_normalise_their_own_pixel_unit_input(name):
    torch.manual_seed(0)
    model = build_model(name, mean=0.5, std=0.25)
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(model.normalize(x), (x - 0.5) / 0.25)
    assert model(x).shape == (4, 10)
    assert "normalize.mean" not in model.state_dict()  # not a weight: the manifest carries it


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(TTTPipeError, match="seed_cnn, seed_rescnn"):
        build_model("resnet50")


def test_bad_std_is_refused():
    with pytest.raises(TTTPipeError, match="std"):
        build_model("seed_cnn", std=0.0)
