"""`ttt-pipe adapt` through Typer's CliRunner on jobs.cli.app: help, a run, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from adapt_fixtures import copy_shards, ttt_checkpoint  # noqa: F401 (fixture)
from typer.testing import CliRunner

from jobs.cli import app
from pipeline import storage
from pipeline.shards import shard_metadata, shard_table

runner = CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, ["adapt", *args], env={"COLUMNS": "200"})


def test_help_lists_options():
    result = _invoke("--help")
    assert result.exit_code == 0
    for option in ("--checkpoint", "--shards", "--steps", "--lr", "--batch-size", "--mode",
                   "--actors", "--gpus-per-actor", "--cpus-per-actor", "--seed", "--out",
                   "--address", "episodic", "online"):
        assert option in result.output


@pytest.mark.ray
def test_adapt_prints_the_accuracy_table_and_writes_results(ray_local, ttt_checkpoint, shard_dir,
                                                            tmp_path):
    out = tmp_path / "results"
    result = _invoke("--checkpoint", ttt_checkpoint, "--shards", str(shard_dir), "--out", str(out),
                     "--steps", "1", "--lr", "0.02", "--batch-size", "8", "--actors", "2")
    assert result.exit_code == 0, result.output
    for text in ("acc@0", "acc@1", "gain", "gaussian_noise", "identity", "4 shard(s), 64 samples"):
        assert text in result.output
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.parquet", "cost.parquet",
                                                     "predictions", "run.json"]
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["steps"] == 1 and run["settings"]["batch_size"] == 8
    assert run["checkpoint"]["method"]["name"] == "ttt" and len(run["shards"]) == 4
    from pipeline.checkpoint import load_checkpoint, model_sha256  # the report's same-model key
    assert run["checkpoint"]["model_sha256"] == model_sha256(load_checkpoint(ttt_checkpoint))
    again = _invoke("--checkpoint", ttt_checkpoint, "--shards", str(shard_dir), "--out", str(out),
                    "--steps", "1", "--lr", "0.02", "--batch-size", "8")
    assert again.exit_code == 0 and "(4 already done)" in again.output


def _nan_shards(src: Path, dst: Path) -> Path:
    copy_shards(src, dst)
    images = np.zeros((3, 1, 28, 28), np.float32)
    images[0, 0, 0, 0] = np.nan
    meta = shard_metadata(dataset="mnist", image_shape=(1, 28, 28), image_dtype="float32",
                          mean=0.1307, std=0.3081, seed=0, corruption="fog",
                          severity=2)
    table = shard_table(np.arange(3), np.zeros(3, np.int64), images, name="fog-s2-00000",
                        corruption="fog", severity=2, metadata=meta)
    storage.atomic_write_table(table, str(dst / "fog-s2-00000.parquet"))
    return dst


BAD = [
    ("missing checkpoint", {"--checkpoint": "MISSING"}, "no checkpoint at"),
    ("other joint method", {"--method": "it3"}, "it3 adapts only a checkpoint trained jointly"),
    ("unknown method", {"--method": "nope"}, "unknown method 'nope'"),
    ("method config key", {"--method-config": '{"bogus": 1}'}, "unknown TTTConfig key(s) bogus; choose from"),
    ("trained field", {"--method-config": '{"layer": "fc1"}'}, "cannot change layer of ttt"),
    ("fisher for ttt", {"--fisher-samples": "3"}, "apply to eata only"),
    ("no shards", {"--shards": "NOSHARDS/*.parquet"}, "no shards found"),
    ("negative steps", {"--steps": "-1"}, "--steps"),
    ("fractional batch", {"--batch-size": "2.5"}, "--batch-size"),
    ("zero lr", {"--lr": "0"}, "--lr"),
    ("zero actors", {"--actors": "0"}, "--actors"),
    ("unknown mode", {"--mode": "sometimes"}, "--mode"),
    ("negative seed", {"--seed": "-2"}, "--seed"),
    ("no gpus", {"--gpus-per-actor": "1"}, "GPU"),
    ("unreachable cluster", {"--address": "127.0.0.1:9"}, "cannot reach the Ray cluster"),
    ("unreachable job address", {"--address": "http://127.0.0.1:9"}, "cannot reach the Ray cluster"),
]


@pytest.mark.ray
@pytest.mark.parametrize("what, change, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_error_and_writes_nothing(ray_local, ttt_checkpoint, shard_dir,
                                                        tmp_path, monkeypatch, what, change,
                                                        message):
    options = {"--checkpoint": ttt_checkpoint, "--shards": str(shard_dir),
               "--out": str(tmp_path / "results"), **change}
    replace = {"MISSING": str(tmp_path / "missing"), "NOSHARDS/*.parquet": str(tmp_path / "x*.parquet"),
               }
    args = [x for k, v in options.items() for x in (k, replace.get(v, v))]
    result = _invoke(*args)
    assert result.exit_code != 0, result.output
    assert message in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert not (tmp_path / "results").exists()


@pytest.mark.ray
def test_nan_shard_fails_in_the_actor_with_its_name(ray_local, ttt_checkpoint, shard_dir, tmp_path):
    """Content checks run where the pixels are read (the driver reads footers only): the run
    stops with one line naming the shard; no predictions or accuracy for it are written."""
    shards = _nan_shards(shard_dir, tmp_path / "nan")
    out = tmp_path / "results"
    result = _invoke("--checkpoint", ttt_checkpoint, "--shards", str(shards), "--out", str(out),
                     "--actors", "1")
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert "fog-s2-00000.parquet' has 1 NaN" in errors[0], result.output
    assert not (out / "predictions" / "fog-s2-00000.parquet").exists()
    assert not (out / "accuracy.parquet").exists()
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temp files
