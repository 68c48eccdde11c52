"""`ttt-pipe corrupt` through Typer's CliRunner on jobs.cli.app: help, success, bad input."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.shards import list_shards, read_shard

runner = CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, ["corrupt", *args], env={"COLUMNS": "200"})


def test_help_lists_options_and_corruptions():
    result = _invoke("--help")
    assert result.exit_code == 0
    for option in ("--dataset", "--data-dir", "--corruptions", "--severities", "--shard-size",
                   "--limit", "--seed", "--out", "--identity", "--download", "--address",
                   "--cpus-per-task"):
        assert option in result.output
    for name in ("gaussian_noise", "fog", "identity", "fashion-mnist", "mnist", "cifar10",
                 "cifar100", "imagenet", "folder:PATH"):
        assert name in result.output


def test_corrupt_writes_shards(ray_local, idx_dir, tmp_path):
    out = tmp_path / "shards"
    result = _invoke("--dataset", "mnist", "--data-dir", str(idx_dir / "mnist"),
                     "--corruptions", "gaussian_noise,fog", "--severities", "2,4",
                     "--shard-size", "20", "--limit", "30", "--seed", "5", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "wrote 10 shards" in result.output and "150 rows" in result.output
    shards = list_shards(str(out))
    assert len(shards) == 10 and not [n for n in os.listdir(out) if n.startswith(".")]
    shard = read_shard(str(out / "fog-s4-00001.parquet"))
    assert len(shard) == 10 and shard.metadata["seed"] == 5


def test_default_severities_and_no_identity(ray_local, idx_dir, tmp_path):
    result = _invoke("--dataset", "fashion-mnist", "--data-dir", str(idx_dir),
                     "--corruptions", "rotate", "--no-identity", "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / "o")) == [f"rotate-s{s}-00000.parquet" for s in range(1, 6)]


@pytest.mark.parametrize("args, message", [
    (["--dataset", "cifar"], "unknown dataset 'cifar'; choose from: cifar10"),
    (["--dataset", "folder:/nonexistent/pets"], "is not a folder"),
    (["--corruptions", "blurr"], "unknown corruption 'blurr'"),
    (["--corruptions", "fog,", "--severities", "6"], "severity 6 is out of range"),
    (["--severities", "0"], "severity 0 is out of range"),
    (["--severities", "x"], "bad severity 'x'"),
    (["--shard-size", "0"], "--shard-size"),
    (["--limit", "-3"], "--limit"),
    (["--seed", "-1"], "--seed"),
    (["--data-dir", "MISSING"], "IDX files not found"),
    (["--out", "UNDER_FILE"], "cannot create directory"),
    (["--out", "FILE"], "is a file"),
])
def test_bad_input_is_one_line_error_and_writes_nothing(idx_dir, tmp_path, args, message):
    (tmp_path / "file").write_text("not a folder")
    values = {"MISSING": str(tmp_path / "missing"), "UNDER_FILE": str(tmp_path / "file" / "out"),
              "FILE": str(tmp_path / "file")}
    args = [values.get(a, a) for a in args]
    base = {"--dataset": "mnist", "--data-dir": str(idx_dir / "mnist"), "--corruptions": "fog",
            "--out": str(tmp_path / "out")}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    result = _invoke(*[x for pair in base.items() for x in pair])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert sum(message in line for line in lines) == 1, result.output  # on one line
    if result.exit_code == 1:  # our errors: exactly one line; typer's usage errors: a box
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert sorted(os.listdir(tmp_path)) == ["file"]  # no shards, no temp files, no folder
    assert "Traceback" not in result.output
