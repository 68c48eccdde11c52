"""benchmarks/gains.py's `--train-set`: training-side settings get their own model cache and
record names, and only fields joint training reads are accepted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import gains  # noqa: E402


def test_train_setting_parses_sorts_and_names_files():
    setting = gains.train_setting("ttt", ["layer=fc1", "aux_weight=1"])
    assert setting == {"aux_weight": 1, "layer": "fc1"}
    assert list(setting) == ["aux_weight", "layer"]  # sorted: one name per setting
    assert gains.setting_suffix(setting) == "-aux_weight=1-layer=fc1"
    assert gains.setting_suffix({"aux_weight": 0.35}) == "-aux_weight=0.35"
    assert gains.setting_suffix({}) == gains.setting_suffix(None) == ""
    assert gains.model_path("/c", "ttt", 20, setting).name == \
        "ttt-fashion-mnist-train50k-seed20-aux_weight=1-layer=fc1.pt"
    assert gains.model_path("/c", "ttt", 20).name == "ttt-fashion-mnist-train50k-seed20.pt"
    assert gains.choice_path("/o", "ttt", {"layer": "fc1"}).name == "gains-choice-ttt-layer=fc1.json"


def test_recipe_fields_are_kept_apart_from_config_fields():
    setting = gains.train_setting("ttt", ["schedule=cosine", "train_epochs=3", "augment=cifar"])
    assert setting == {"augment": "cifar", "schedule": "cosine", "train_epochs": 3}
    assert gains.config_part(setting) == {"train_epochs": 3}
    assert gains.recipe_part(setting) == {"augment": "cifar", "schedule": "cosine"}
    assert gains.model_path("/c", "ttt", 20, setting).name == \
        "ttt-fashion-mnist-train50k-seed20-augment=cifar-schedule=cosine-train_epochs=3.pt"
    assert gains.config_part(None) == gains.recipe_part(None) == {}


@pytest.mark.parametrize("item", ["lr=0.1", "steps=3", "layer", "layer=", "nonsense=1",
                                  "augment=imagenet", "schedule=step"])
def test_train_setting_refuses_test_time_and_unknown_fields(item):
    with pytest.raises(SystemExit, match="--train-set"):
        gains.train_setting("ttt", [item])


def test_recipe_options_change_training_and_none_is_the_seeds_recipe():
    import torch

    from _common import build_engine, train
    from pipeline.datasets import DATASETS

    spec = DATASETS["fashion-mnist"]
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
    config = gains.engines.TTTConfig(train_batch_size=8, train_epochs=2)

    def trained(**recipe):
        engine = build_engine("ttt", spec, 3, config)
        train(engine, x, y, **recipe)
        return engine.state_dict()

    seeds = trained()
    same = trained(augment="none", schedule="none")
    assert all(torch.equal(seeds[k], same[k]) for k in seeds)
    for recipe in ({"augment": "cifar"}, {"schedule": "cosine"}):
        other = trained(**recipe)
        assert not all(torch.equal(seeds[k], other[k]) for k in seeds), recipe
        assert all(torch.equal(other[k], trained(**recipe)[k]) for k in other), recipe  # seeded
    with pytest.raises(ValueError, match="schedule"):
        trained(schedule="step")
