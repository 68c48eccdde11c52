"""`ttt-pipe train --workers N`: data-parallel training through Ray Train's TorchTrainer (DDP on
gloo here) on the shared local Ray. One 2-worker run (0.5 CPU each, 1 epoch) is shared by the
tests: its checkpoint adapts, its manifest records the workers, the ranks trained on disjoint
shards covering the epoch and ended with identical weights."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import jobs.train
from jobs.cli import app
from jobs.train_parallel import RECORD_ENV, check_fits
from pipeline.checkpoint import load_checkpoint
from pipeline.errors import TTTPipeError
from pipeline.training.parallel import check_even_shards, shard_rows

runner = CliRunner()


def _train(idx_dir, out, *extra: str):
    return runner.invoke(app, [
        "train", "--method", "ttt", "--dataset", "mnist", "--data-dir", str(idx_dir / "mnist"),
        "--out", str(out), "--limit", "64", "--batch-size", "16", "--epochs", "1", "--gpus", "0",
        *extra], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def two_workers(ray_local, idx_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    record = root / "record"
    record.mkdir()
    events = []
    real_train = jobs.train.train

    def recording_train(spec, address=None, on_event=None):
        def on(kind, info):  # when each event arrives: was the checkpoint already written?
            events.append((kind, info, (root / "ckpt" / "manifest.json").exists()))
            on_event(kind, info)
        return real_train(spec, address, on_event=on)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(RECORD_ENV, str(record))
        mp.setattr(jobs.train, "train", recording_train)
        result = _train(idx_dir, root / "ckpt", "--workers", "2", "--cpus", "0.5")
    assert result.exit_code == 0, result.output
    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    return root / "ckpt", result, ranks, events


def test_shards_are_disjoint_and_cover_the_permutation():
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    shards = [shard_rows(order, r, 3) for r in range(3)]
    assert sorted(torch.cat(shards).tolist()) == list(range(10))
    assert shard_rows(order, 0, 1) is order
    check_even_shards(64, 2, 16)
    with pytest.raises(TTTPipeError, match="different batch counts"):
        check_even_shards(33, 2, 16)  # 17 rows -> 2 batches, 16 rows -> 1
    with pytest.raises(TTTPipeError, match="--workers 2 or less"):
        check_fits(3, 1.0, 0.0, [{"Resources": {"CPU": 2.0}}])


@pytest.mark.ray
def test_two_workers_write_an_adaptable_checkpoint(two_workers, shard_dir, tmp_path):
    out, result, *_ = two_workers
    manifest = json.loads((out / "manifest.json").read_text())
    t = manifest["training"]
    assert t["workers"] == 2 and t["global_batch_size"] == 32 and t["batch_size"] == 16
    assert [m["epoch"] for m in t["metrics"]] == [1]
    assert math.isfinite(t["metrics"][0]["loss"]) and 0 <= t["metrics"][0]["accuracy"] <= 1
    assert "epoch 1/1" in result.output and "checkpoint" in result.output
    assert not (out.parent / "ckpt.train-state").exists()
    assert load_checkpoint(str(out), expect_method="ttt").manifest["weights_sha256"] == manifest["weights_sha256"]
    adapted = runner.invoke(app, ["adapt", "--checkpoint", str(out), "--shards", str(shard_dir),
                                  "--out", str(tmp_path / "res"), "--steps", "1", "--batch-size", "8",
                                  "--actors", "1"], env={"COLUMNS": "200"})
    assert adapted.exit_code == 0, adapted.output
    assert "acc@1" in adapted.output


@pytest.mark.ray
def test_progress_is_live_from_rank_0(two_workers):
    """Setup and a report per chunk reach the driver while the workers run (before the
    checkpoint exists), not replayed from the manifest afterwards."""
    *_, events = two_workers
    kinds = [k for k, _, _ in events]
    assert kinds[0] == "setup" and kinds[-1] == "saved" and "progress" in kinds
    setup = events[0][1]
    assert setup["workers"] == 2 and setup["batches_per_epoch"] == 2  # 32 rows per rank, batch 16
    progress = [info for k, info, _ in events if k == "progress"]
    assert [p["batches_done"] for p in progress] == [1, 2]  # 1/20 epoch rounds up to one batch
    assert progress[0]["epoch_metrics"] is None and progress[-1]["finished"]
    assert not any(written for k, _, written in events if k != "saved")


@pytest.mark.ray
def test_ranks_saw_disjoint_data_covering_the_epoch_and_agree(two_workers):
    out, _, ranks, _ = two_workers
    rows = [set(r["rows"]) for r in ranks]
    assert all(len(r) == 32 for r in rows) and not rows[0] & rows[1]
    assert rows[0] | rows[1] == set(range(64))  # the single worker's epoch
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]  # DDP kept them in step
    assert [r["world_size"] for r in ranks] == [2, 2]


@pytest.mark.ray
@pytest.mark.parametrize("extra, needle", [
    (("--workers", "0"), "--workers must be an integer >= 1"),
    (("--workers", "9", "--cpus", "1"), "--workers 9 needs 9 x (1 CPU)"),
])
def test_bad_worker_counts_fail_in_one_line(ray_local, idx_dir, tmp_path, extra, needle):
    result = _train(idx_dir, tmp_path / "ckpt", *extra)
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], result.output
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.ray
def test_killed_two_worker_run_resumes_from_its_last_epoch(ray_local, idx_dir, tmp_path, monkeypatch):
    from jobs.train import KILL_ENV

    out = tmp_path / "ckpt"
    monkeypatch.setenv(KILL_ENV, str(tmp_path / "killed-once"))
    args = ("--workers", "2", "--cpus", "0.5", "--epochs", "2")
    first = _train(idx_dir, out, *args)
    assert first.exit_code == 1 and "data-parallel training failed" in first.output, first.output
    errors = [line for line in first.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, first.output
    print(errors[0])
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / "ckpt.train-state").iterdir()) == ["state.pt"]
    second = _train(idx_dir, out, *args)  # the marker exists: rank 0 lives
    assert second.exit_code == 0, second.output
    assert "resuming after epoch 1/2" in second.output and "epoch 2/2" in second.output
    t = json.loads((out / "manifest.json").read_text())["training"]
    assert t["resumed_from_epoch"] == 1 and [m["epoch"] for m in t["metrics"]] == [1, 2]
    assert not (tmp_path / "ckpt.train-state").exists()
