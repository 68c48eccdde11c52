"""`ttt-pipe train` end to end on the shared local Ray: checkpoint contents, the auxiliary part
really trains, determinism, and one-line failures that leave no checkpoint behind."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from typer.testing import CliRunner

import engines
from jobs.cli import app
from jobs.train import plan_trainer, resolve_spec
from pipeline.checkpoint import build_engine_from_checkpoint, load_checkpoint
from pipeline.errors import TTTPipeError
from pipeline.models import build_model

pytestmark = pytest.mark.ray


def _train(idx_dir, out, *extra: str, method: str = "ttt"):
    args = ["train", "--method", method, "--dataset", "mnist", "--data-dir", str(idx_dir / "mnist"),
            "--out", str(out), "--limit", "64", "--batch-size", "16", *extra]
    return CliRunner().invoke(app, args)


def _error_line(result) -> str:
    """The one error line, which ends the output (progress lines may come before it)."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    return errors[0]


@pytest.fixture(scope="module")
def trained(ray_local, idx_dir, tmp_path_factory):
    """One checkpoint per method, trained through the CLI (shared by the tests below)."""
    root = tmp_path_factory.mktemp("ckpts")
    results = {}
    for method in ("ttt", "it3"):
        out = root / method
        result = _train(idx_dir, out, "--epochs", "2", method=method)
        assert result.exit_code == 0, result.output
        results[method] = (out, result)
    return results


@pytest.mark.parametrize("method", ["ttt", "it3"])
def test_checkpoint_files_manifest_and_sha(trained, method):
    out, result = trained[method]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "weights.pt"]
    manifest = json.loads((out / "manifest.json").read_text())
    weights = (out / "weights.pt").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == manifest["weights_sha256"]
    state = torch.load(out / "weights.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert manifest["method"]["name"] == method
    assert manifest["model"]["name"] == {"ttt": "seed_cnn", "it3": "seed_rescnn"}[method]
    assert manifest["dataset"]["name"] == "mnist" and manifest["dataset"]["std"] == pytest.approx(0.3081)
    training = manifest["training"]
    assert training["epochs"] == 2 and training["limit"] == 64 and training["samples"] == 64
    assert training["train"] == "all" and training["init"] is None  # no --init
    assert [m["epoch"] for m in training["metrics"]] == [1, 2]
    assert all(set(m) >= {"loss", "accuracy", "aux_loss"} for m in training["metrics"])
    assert "epoch 2/2" in result.output and "checkpoint" in result.output


@pytest.mark.parametrize("method", ["ttt", "it3"])
def test_auxiliary_part_trained_and_engine_rebuilds(trained, method):
    """The head/embedder moved away from its initial weights (torch-ttt never trains it)."""
    out, _ = trained[method]
    ckpt = load_checkpoint(str(out), expect_method=method)
    m = ckpt.manifest
    torch.manual_seed(m["training"]["seed"])  # the trainer's initial weights
    fresh = engines.get_engine(method)(build_model(m["model"]["name"], **m["model"]["kwargs"]),
                                       torch.zeros(1, 1, 28, 28), m["method"]["config"])
    aux = {k: v for k, v in fresh.state_dict().items() if not k.startswith("model.")}
    assert aux, "the engine has no auxiliary part"
    for key, init in aux.items():
        assert not torch.equal(ckpt.state_dict[key], init), f"{key} never trained"
    model_changed = [k for k, v in fresh.state_dict().items()
                     if k.startswith("model.") and not torch.equal(ckpt.state_dict[k], v)]
    assert model_changed
    engine = build_engine_from_checkpoint(ckpt)
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        assert engine.predict(x).shape == (8, 10)


def test_same_seed_same_weights(trained, idx_dir, tmp_path):
    first = json.loads((trained["ttt"][0] / "manifest.json").read_text())["weights_sha256"]
    again = _train(idx_dir, tmp_path / "again", "--epochs", "2")
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "again" / "manifest.json").read_text())["weights_sha256"] == first


def test_wrong_method_is_refused(trained):
    with pytest.raises(TTTPipeError, match="trained for method 'ttt'"):
        load_checkpoint(str(trained["ttt"][0]), expect_method="it3")


@pytest.mark.parametrize("extra, words", [
    (["--layer", "fc9"], "unknown layer 'fc9'"),
    (["--model", "resnet51"], "unknown model 'resnet51'"),
    (["--model", "resnet50"], "model 'resnet50' takes RGB images"),
    (["--lr", "1e30"], "training diverged"),  # fails mid-training, inside the actor
])
def test_failing_train_leaves_no_checkpoint(ray_local, idx_dir, tmp_path, extra, words):
    out = tmp_path / "ckpt"
    result = _train(idx_dir, out, *extra)
    assert result.exit_code == 1
    line = _error_line(result)
    assert line.startswith("error:") and words in line
    assert list(tmp_path.iterdir()) == []


def test_missing_data_is_a_one_line_error(ray_local, tmp_path):
    """The data is read inside the actor (on its node): its error still arrives as one line."""
    out = tmp_path / "ckpt"
    result = CliRunner().invoke(app, ["train", "--method", "ttt", "--dataset", "mnist",
                                      "--data-dir", str(tmp_path / "nothing"), "--out", str(out)])
    assert result.exit_code == 1 and "IDX files not found" in _error_line(result)
    assert not out.exists()


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--epochs", "-1"), ("--batch-size", "0"),
                                         ("--limit", "0"), ("--lr", "0"), ("--lr", "nan"),
                                         ("--aux-weight", "-1"), ("--gpus", "-1"),
                                         ("--cpus", "0"), ("--cpus", "64")])
def test_bad_numbers_are_one_line_errors(idx_dir, tmp_path, flag, value):
    result = _train(idx_dir, tmp_path / "ckpt", flag, value)
    assert result.exit_code == 1
    assert flag in _error_line(result)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("flag", ["--epochs", "--batch-size", "--limit"])
def test_non_integers_are_rejected(idx_dir, tmp_path, flag):
    result = _train(idx_dir, tmp_path / "ckpt", flag, "1.5")
    assert result.exit_code != 0 and flag in result.output
    assert not (tmp_path / "ckpt").exists()


def test_defaults_come_from_the_method_configs():
    ttt = resolve_spec("ttt", "mnist", "ck")
    it3 = resolve_spec("it3", "fashion-mnist", "ck")
    assert (ttt.model, ttt.epochs, ttt.batch_size, ttt.lr) == ("seed_cnn", 1, 64, 1e-2)
    assert ttt.config["layer"] == "fc2" and ttt.config["aux_weight"] == 0.35
    assert (it3.model, it3.epochs, it3.batch_size, it3.lr) == ("seed_rescnn", 2, 256, 1e-3)
    assert it3.config["layer"] == "fc1"  # IT3Config default (measured best, benchmarks/README)
    assert resolve_spec("ttt", "mnist", "ck", epochs=3, lr=0.5).config["train_epochs"] == 3


def test_preset_replaces_the_defaults_and_options_override_it():
    from engines.config import IT3Config, TTTConfig

    ttt = resolve_spec("ttt", "mnist", "ck", preset="seeds")
    assert ttt.config == TTTConfig.preset("seeds").to_dict()
    assert (ttt.epochs, ttt.batch_size, ttt.lr) == (1, 64, 1e-2)
    tut = resolve_spec("it3", "mnist", "ck", model="seed_cnn", preset="tutorial", epochs=1)
    assert tut.config["layer"] == "conv1" and tut.config["variant"] == "torch_ttt"  # preset's layer
    assert tut.epochs == 1 and tut.config["steps"] == IT3Config.tutorial().steps
    with pytest.raises(TTTPipeError, match="--preset: unknown TTTConfig preset 'nope'"):
        resolve_spec("ttt", "mnist", "ck", preset="nope")


def test_trainer_resources():
    assert plan_trainer(None, 0, 2, local=True).num_gpus == 0  # CPU box
    assert plan_trainer(1, 0, 2, local=True).num_gpus == 0     # asked, none here: CPU
    assert plan_trainer(1, 0, 2, local=False).num_gpus == 1    # autoscaler may add one
    assert plan_trainer(None, 2, 8, local=False).num_gpus == 1
    cpu = plan_trainer(0, 4, 16, local=False)  # threads never exceed the reserved CPUs
    assert cpu.num_gpus == 0 and cpu.num_cpus == 1 and cpu.threads == 1
    big = plan_trainer(0, 0, 16, local=False, cpus=4.5)
    assert big.num_cpus == 4.5 and big.threads == 4
    with pytest.raises(TTTPipeError, match=r"--cpus 4 exceeds this machine's 2 CPUs; pass --cpus 2"):
        plan_trainer(None, 0, 2, local=True, cpus=4)
    with pytest.raises(TTTPipeError, match="--cpus must be a number >= 1"):
        resolve_spec("ttt", "mnist", "ck", cpus=0.5)


def test_unknown_preset_is_a_one_line_error(idx_dir, tmp_path):
    result = _train(idx_dir, tmp_path / "ckpt", "--preset", "nope")
    assert result.exit_code != 0
    assert "--preset: unknown TTTConfig preset 'nope'; choose from: seeds" in _error_line(result)
    assert not (tmp_path / "ckpt").exists()
