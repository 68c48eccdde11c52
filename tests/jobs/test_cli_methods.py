"""The methods without joint training from the CLI, on the shared local Ray and tiny data:
`train --method source`, `adapt --method norm|tent|eata` on a source and on a ttt checkpoint,
the one-line refusals, and `run --method source,norm,ttt` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from adapt_fixtures import listing, read_predictions, ttt_checkpoint  # noqa: F401 (fixture)
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.checkpoint import load_checkpoint
from pipeline.models import build_model

pytestmark = pytest.mark.ray

runner = CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, [*args], env={"COLUMNS": "200"})


def _error_line(result) -> str:
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


@pytest.fixture(scope="module")
def source_ckpt(ray_local, idx_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("src") / "source"
    result = _invoke("train", "--method", "source", "--dataset", "mnist", "--data-dir",
                     str(idx_dir / "mnist"), "--out", str(out), "--limit", "64", "--batch-size",
                     "16", "--epochs", "2", "--val-fraction", "0.25")
    assert result.exit_code == 0, result.output
    return out, result


def _adapt(ckpt, shards, out, *extra: str):
    return _invoke("adapt", "--checkpoint", str(ckpt), "--shards", str(shards), "--out", str(out),
                   "--actors", "1", "--batch-size", "8", *extra)


def _check_results(out: Path, method: str, steps: int, samples: int = 16) -> None:
    """accuracy.parquet and every prediction carry `method`; exactly one row per (sample, step)."""
    acc = pq.read_table(out / "accuracy.parquet").to_pylist()
    assert {r["method"] for r in acc} == {method}
    assert sorted({r["step"] for r in acc}) == list(range(steps + 1))
    tables = read_predictions(out)
    assert len(tables) == 4
    for name, table in tables.items():
        assert set(table.column("method").to_pylist()) == {method}
        pairs = list(zip(table.column("sample_id").to_pylist(), table.column("step").to_pylist()))
        assert len(pairs) == len(set(pairs)) == samples * (steps + 1), name
    assert json.loads((out / "run.json").read_text())["settings"]["method"] == method


def test_train_source_writes_a_model_alone_checkpoint(source_ckpt):
    out, result = source_ckpt
    assert "checkpoint" in result.output and "source + seed_cnn_bn" in result.output
    ckpt = load_checkpoint(str(out), expect_method="source")
    t = ckpt.manifest["training"]
    assert ckpt.model_name == "seed_cnn_bn" and t["val_samples"] == 16 and len(t["metrics"]) == 2
    assert "val_accuracy" in t["metrics"][-1] and t["metrics"][-1]["aux_loss"] == 0.0
    assert ckpt.state_dict.keys() == build_model("seed_cnn_bn").state_dict().keys()  # no prefix
    assert ckpt.manifest["method"]["config"]["train_epochs"] == 2
    assert not Path(f"{out}.train-state").exists()


@pytest.mark.parametrize("method", ["norm", "tent"])
def test_adapt_a_source_checkpoint_with_norm_and_tent(source_ckpt, shard_dir, tmp_path, method):
    out = tmp_path / method
    result = _adapt(source_ckpt[0], shard_dir, out, "--method", method, "--steps", "2")
    assert result.exit_code == 0, result.output
    assert f"{method}: accuracy" in result.output
    _check_results(out, method, steps=2)
    if method == "norm":  # no parameter changes: every step predicts as step 0
        for table in read_predictions(out).values():
            rows = table.to_pylist()
            by = {(r["sample_id"], r["step"]): r["pred"] for r in rows}
            assert all(by[(s, 2)] == by[(s, 0)] for s, _ in by)
    # resume into the same folder with another method is refused, nothing changes
    before = listing(out)
    again = _adapt(source_ckpt[0], shard_dir, out, "--method", "source", "--steps", "2")
    assert again.exit_code != 0
    assert f"other settings (method '{method}' vs 'source'" in _error_line(again)
    assert listing(out) == before


def test_adapt_a_ttt_checkpoint_with_tent(ttt_checkpoint, shard_dir, tmp_path):
    """The ttt checkpoint's seed_cnn has no norm layer: tent's default (the norm affines) is a
    one-line error in the driver, and --method-config adapts every parameter instead."""
    out = tmp_path / "tent"
    result = _adapt(ttt_checkpoint, shard_dir, out, "--method", "tent")
    assert result.exit_code != 0 and "selects no trainable parameter" in _error_line(result)
    assert not out.exists()
    result = _adapt(ttt_checkpoint, shard_dir, out, "--method", "tent", "--steps", "1",
                    "--method-config", '{"adapt_params": "model", "lr": 0.001, "steps": 4}')
    assert result.exit_code == 0, result.output
    _check_results(out, "tent", steps=1)
    run = json.loads((out / "run.json").read_text())
    assert run["checkpoint"]["method"]["name"] == "ttt" and run["method"]["name"] == "tent"
    assert run["method"]["config"]["adapt_params"] == "model"
    assert run["method"]["config"]["steps"] == 1  # the flag won, and run.json says what ran
    assert json.loads(run["settings"]["method_config"]) == {"adapt_params": "model", "lr": 0.001,
                                                            "steps": 4}


@pytest.mark.parametrize("extra, message", [
    (("--method", "ttt"), "ttt adapts only a checkpoint trained jointly with its auxiliary part"),
    (("--method", "tent", "--method-config", '{"e_margin": 0.4}'),
     "unknown TentConfig key(s) e_margin; choose from: adam_eps"),
    (("--method", "eata", "--data-dir", "NOWHERE"), "EATA's Fisher reads clean mnist train images"),
])
def test_refusals_are_one_line_and_write_nothing(source_ckpt, shard_dir, tmp_path, extra, message):
    out = tmp_path / "r"
    extra = tuple(str(tmp_path / "nowhere") if x == "NOWHERE" else x for x in extra)
    result = _adapt(source_ckpt[0], shard_dir, out, *extra)
    assert result.exit_code != 0
    line = _error_line(result)
    assert message in line, line
    if "ttt adapts only" in message:
        assert "ttt-pipe train --method ttt" in line
    assert not out.exists()


def test_eata_with_its_fisher_from_tiny_training_data(source_ckpt, idx_dir, shard_dir, tmp_path):
    out = tmp_path / "eata"
    result = _adapt(source_ckpt[0], shard_dir, out, "--method", "eata", "--steps", "1",
                    "--data-dir", str(idx_dir / "mnist"), "--fisher-samples", "32")
    assert result.exit_code == 0, result.output
    _check_results(out, "eata", steps=1)
    s = json.loads((out / "run.json").read_text())["settings"]
    assert (s["fisher_data"], s["fisher_samples"]) == ("train", 32)
    for f in (out / "predictions").glob("*.parquet"):  # the bytes do not name the mount point
        assert str(idx_dir) not in str(pq.read_schema(f).metadata)
    # (the Fisher's determinism: tests/pipeline/test_method_choice.py, no Ray)
    # resume with another Fisher sample count is refused
    other = _adapt(source_ckpt[0], shard_dir, out, "--method", "eata", "--steps", "1",
                   "--data-dir", str(idx_dir / "mnist"), "--fisher-samples", "16")
    assert other.exit_code != 0 and "fisher_samples 32 vs 16" in _error_line(other)


def test_run_source_norm_ttt_end_to_end(ray_local, idx_dir, tmp_path):
    out = tmp_path / "demo"
    args = ["run", "--dataset", "mnist", "--data-dir", str(idx_dir / "mnist"), "--out", str(out),
            "--corruptions", "gaussian_noise", "--severities", "5", "--limit", "16",
            "--steps", "1", "--actors", "1", "--method", "source,norm,ttt", "--epochs", "1"]
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["source", "ttt"]
    assert "[1/4] train source (for norm)" in result.output
    assert load_checkpoint(str(out / "checkpoints" / "source")).model_name == "seed_cnn_bn"
    assert sorted(p.name for p in (out / "results").iterdir()) == ["norm", "source", "ttt"]
    for method in ("source", "norm", "ttt"):
        acc = pq.read_table(out / "results" / method / "accuracy.parquet").to_pylist()
        assert {r["method"] for r in acc} == {method} and all(r["n"] == 16 for r in acc)
        run = json.loads((out / "results" / method / "run.json").read_text())
        assert run["checkpoint"]["uri"].endswith("source" if method != "ttt" else "ttt")
    assert (out / "report" / "index.html").is_file()
    for method in ("source", "norm", "ttt"):
        assert method in result.output
    again = _invoke(*args)  # resumes: both checkpoints reused
    assert again.exit_code == 0, again.output
    assert again.output.count("reusing") == 2


def test_run_method_list_parsing():
    from jobs.commands.run import checkpoint_method, parse_run_methods

    assert parse_run_methods("both") == ["ttt", "it3"]
    assert parse_run_methods("source, tent,both,tent") == ["source", "tent", "ttt", "it3"]
    assert [checkpoint_method(m) for m in ("ttt", "it3", "tent", "source")] == [
        "ttt", "it3", "source", "source"]


def test_save_adapted_with_another_method_loads_back_as_that_method(source_ckpt, shard_dir, tmp_path):
    """A source checkpoint adapted online by tent: each saved checkpoint is a tent checkpoint
    (the weights are tent's engine), which adapt runs as it is."""
    out, saved = tmp_path / "tent", tmp_path / "adapted"
    result = _adapt(source_ckpt[0], shard_dir, out, "--method", "tent", "--mode", "online",
                    "--steps", "1", "--save-adapted", str(saved))
    assert result.exit_code == 0, result.output
    first = sorted(p for p in saved.iterdir() if p.is_dir())[0]
    manifest = load_checkpoint(str(first)).manifest
    assert manifest["method"]["name"] == "tent" and manifest["method"]["config"]["mode"] == "online"
    again = _adapt(first, shard_dir, tmp_path / "again", "--steps", "1")
    assert again.exit_code == 0, again.output
    _check_results(tmp_path / "again", "tent", steps=1)
