"""`ttt-pipe train` on the shared local Ray: a trainer killed after epoch 1 of 2 resumes from its
state and writes the same weights as an uninterrupted run; the training options reach the
manifest; per-epoch validation; one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from jobs.cli import app
from jobs.train import KILL_ENV

pytestmark = pytest.mark.ray

RECIPE = ("--optimizer", "sgd", "--lr", "0.05", "--augment", "cifar", "--val-fraction", "0.25",
          "--epochs", "2", "--batch-size", "16", "--limit", "64")


def _train(idx_dir, out, *extra: str):
    args = ["train", "--method", "ttt", "--dataset", "mnist", "--data-dir", str(idx_dir / "mnist"),
            "--out", str(out), *extra]
    return CliRunner().invoke(app, args)


def _weights(out):
    return torch.load(out / "weights.pt", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(ray_local, idx_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "ckpt"
    result = _train(idx_dir, out, *RECIPE)
    assert result.exit_code == 0, result.output
    return out, result


def test_killed_trainer_resumes_bit_identically(uninterrupted, idx_dir, tmp_path, monkeypatch):
    whole, _ = uninterrupted
    out = tmp_path / "ckpt"
    monkeypatch.setenv(KILL_ENV, str(tmp_path / "killed-once"))
    first = _train(idx_dir, out, *RECIPE)
    assert first.exit_code == 1 and "the trainer actor died" in first.output, first.output
    assert not out.exists()  # no checkpoint, only the state of epoch 1
    assert sorted(p.name for p in (tmp_path / "ckpt.train-state").iterdir()) == ["state.pt"]

    second = _train(idx_dir, out, *RECIPE)  # the marker exists: this trainer lives
    assert second.exit_code == 0, second.output
    assert "resuming after epoch 1/2" in second.output and "epoch 2/2" in second.output
    assert "epoch 1/2" not in second.output.replace("resuming after epoch 1/2", "")
    assert not (tmp_path / "ckpt.train-state").exists()  # removed once the checkpoint is written
    a, b = _weights(whole), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = json.loads((out / "manifest.json").read_text())["training"]
    plain = json.loads((whole / "manifest.json").read_text())["training"]
    assert resumed["resumed_from_epoch"] == 1 and plain["resumed_from_epoch"] == 0
    for m, n in zip(resumed["metrics"], plain["metrics"]):
        for key in ("loss", "accuracy", "aux_loss", "val_accuracy", "lr"):
            assert m[key] == n[key], key


def test_options_and_validation_in_the_manifest(uninterrupted):
    out, result = uninterrupted
    t = json.loads((out / "manifest.json").read_text())["training"]
    assert (t["optimizer"], t["lr"], t["momentum"], t["weight_decay"], t["schedule"]) == \
        ("sgd", 0.05, 0.9, 5e-4, "cosine")
    assert (t["augment"], t["precision"], t["val_fraction"]) == ("cifar", "fp32", 0.25)
    assert (t["samples"], t["val_samples"], t["train_samples"]) == (64, 16, 48)
    assert [m["epoch"] for m in t["metrics"]] == [1, 2]
    assert all(0 <= m["val_accuracy"] <= 1 and m["images_per_s"] > 0 for m in t["metrics"])
    assert "val accuracy" in result.output and "16 held out for validation" in result.output
    assert "epoch 1/2:" in result.output and "eta " in result.output.split("epoch 1/2:")[1].splitlines()[0]
    assert "eta " not in result.output.split("epoch 2/2:")[1].splitlines()[0]


def test_other_settings_than_the_interrupted_run_are_refused(ray_local, idx_dir, tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    monkeypatch.setenv(KILL_ENV, str(tmp_path / "killed-once"))
    args = ("--epochs", "2", "--batch-size", "16", "--limit", "32")
    assert _train(idx_dir, out, *args).exit_code == 1
    other = _train(idx_dir, out, *args, "--lr", "0.002")
    assert other.exit_code == 1
    line = [x for x in other.output.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "holds an interrupted run with other settings" in line[0], other.output
    assert not out.exists()
    resumed = _train(idx_dir, out, *args)  # the same settings continue it
    assert resumed.exit_code == 0 and "resuming after epoch 1/2" in resumed.output, resumed.output


def test_bf16_trains_through_the_cli(ray_local, idx_dir, tmp_path):
    out = tmp_path / "ckpt"
    result = _train(idx_dir, out, "--precision", "bf16", "--limit", "32", "--batch-size", "16")
    assert result.exit_code == 0, result.output
    t = json.loads((out / "manifest.json").read_text())["training"]
    assert t["precision"] == "bf16" and math.isfinite(t["metrics"][0]["loss"])


@pytest.mark.parametrize("extra, words", [
    (("--precision", "fp16", "--gpus", "0"), "--precision fp16 needs a CUDA GPU"),
    (("--optimizer", "lbfgs"), "--optimizer must be one of adam, sgd"),
    (("--momentum", "0.9"), "--momentum applies to --optimizer sgd only"),
    (("--val-fraction", "1"), "--val-fraction must be a number >= 0 and < 1"),
])
def test_bad_training_options_are_one_line_errors(idx_dir, tmp_path, extra, words):
    result = _train(idx_dir, tmp_path / "ckpt", *extra)
    assert result.exit_code == 1
    errors = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], result.output
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "ckpt.train-state").exists()
