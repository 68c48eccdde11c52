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


@pytest.mark.parametrize("item", ["lr=0.1", "steps=3", "layer", "layer=", "nonsense=1"])
def test_train_setting_refuses_test_time_and_unknown_fields(item):
    with pytest.raises(SystemExit, match="--train-set"):
        gains.train_setting("ttt", [item])
