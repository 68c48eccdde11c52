"""`ttt-pipe import-model` through the CLI: a checkpoint and one summary line, or one error line
and exit 1 with nothing written (no Ray: one file in, one checkpoint out)."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.models import build_model


def test_import_model_cli_writes_a_checkpoint_or_one_error_line(tmp_path):
    weights = tmp_path / "seed.pt"
    torch.save({"model": {"module." + k: v for k, v in build_model("seed_cnn_bn").state_dict().items()}}, weights)
    out = tmp_path / "ckpt"
    args = ["import-model", "--model", "seed_cnn_bn", "--weights", str(weights), "--dataset", "fashion-mnist",
            "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "method source" in result.output and "stripped 'module.'" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"]["name"] == "fashion-mnist" and manifest["model"]["kwargs"]["mean"] == 0.286

    bad = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "bad"), "--normalize", "imagenet"])
    assert bad.exit_code == 1
    lines = [line for line in bad.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "3 mean values for 1-channel" in lines[0]
    assert not (tmp_path / "bad").exists()


def test_import_model_cli_for_a_method_without_joint_training(tmp_path):
    """--method tent writes a tent checkpoint (adapted with tent by default); ttt is refused:
    its auxiliary part needs training."""
    weights = tmp_path / "seed.pt"
    torch.save(build_model("seed_cnn_bn").state_dict(), weights)
    args = ["import-model", "--model", "seed_cnn_bn", "--weights", str(weights), "--dataset", "mnist"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "tent"), "--method", "tent"])
    assert result.exit_code == 0, result.output
    assert "method tent" in result.output
    manifest = json.loads((tmp_path / "tent" / "manifest.json").read_text())
    assert manifest["method"]["name"] == "tent" and manifest["method"]["config"]["adapt_params"] == "norm"
    bad = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "ttt"), "--method", "ttt"])
    assert bad.exit_code == 1 and "auxiliary part (head) that needs training" in bad.output
    assert not (tmp_path / "ttt").exists()
