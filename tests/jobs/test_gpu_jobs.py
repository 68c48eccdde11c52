"""`ttt-pipe train` and `ttt-pipe adapt` on GPU actors (scripts/gpu_check.sh runs these; they
skip without CUDA, `TTT_PIPE_GPU_DRY_RUN=1` runs them on logical GPUs of the CPU).

Each test adds a node with one GPU to the shared local cluster (on a CUDA machine Ray hands the
actor the real GPU: `CUDA_VISIBLE_DEVICES`, `jobs.cluster.actor_device`), runs the job there and
compares it with the same job on the CPU: the device recorded is cuda:0, every (sample, step) has
exactly one prediction, and the predictions agree with the CPU's (argmax equal on >= 97% of the
rows: CUDA's reduction order and Adam's sign-like first steps move near-ties).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from adapt_fixtures import assert_complete, read_predictions, ttt_checkpoint  # noqa: F401
from gpu_helpers import DEVICE, needs_gpu
from typer.testing import CliRunner

from jobs.adapt import AdaptRequest, run_adapt
from jobs.cli import app

pytestmark = pytest.mark.ray

STEPS = 2


def _shard_samples(shards) -> dict[str, int]:
    return {p.stem: pq.read_metadata(p).num_rows for p in sorted(shards.glob("*.parquet"))}


def _argmax_agreement(a: dict, b: dict) -> float:
    same = total = 0
    for name in a:
        x, y = a[name].sort_by([("step", "ascending"), ("sample_id", "ascending")]), \
            b[name].sort_by([("step", "ascending"), ("sample_id", "ascending")])
        px, py = np.asarray(x.column("pred")), np.asarray(y.column("pred"))
        same, total = same + int((px == py).sum()), total + len(px)
    return same / total


@needs_gpu
@pytest.mark.timeout(600)
def test_gpu_adapt_job_matches_cpu(ray_local, ttt_checkpoint, shard_dir, nodes, tmp_path):  # noqa: F811
    cpu_out, gpu_out = tmp_path / "cpu", tmp_path / "gpu"
    run_adapt(AdaptRequest(ttt_checkpoint, str(shard_dir), str(cpu_out), actors=1, steps=STEPS))
    nodes.add(num_cpus=1, num_gpus=1)
    outcome = run_adapt(AdaptRequest(ttt_checkpoint, str(shard_dir), str(gpu_out), actors=1,
                                     steps=STEPS, gpus_per_actor=1, address="auto"))
    assert {s["device"] for s in outcome.shard_summaries} == {str(DEVICE)}
    assert_complete(gpu_out, _shard_samples(shard_dir), STEPS)
    assert _argmax_agreement(read_predictions(cpu_out), read_predictions(gpu_out)) >= 0.97


def _train_on_gpus(idx_dir, out, *extra: str) -> dict:
    """`ttt-pipe train` (ttt, 64 mnist images, 1 GPU per trainer/worker) on the test cluster:
    the written manifest's `training` entry."""
    result = CliRunner().invoke(app, [
        "train", "--method", "ttt", "--dataset", "mnist", "--data-dir", str(idx_dir / "mnist"),
        "--out", str(out), "--limit", "64", "--batch-size", "16", "--epochs", "1", "--gpus", "1",
        *extra, "--address", "auto"])
    assert result.exit_code == 0, result.output
    return json.loads((out / "manifest.json").read_text())["training"]


@needs_gpu
@pytest.mark.timeout(600)
def test_gpu_train_job_writes_a_cuda_trained_checkpoint(ray_local, idx_dir, nodes, tmp_path):
    nodes.add(num_cpus=1, num_gpus=1)
    training = _train_on_gpus(idx_dir, tmp_path / "ckpt", "--precision", "bf16")
    assert training["device"] == str(DEVICE)
    assert training["precision"] == "bf16"


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA GPUs (NCCL refuses two ranks on one GPU; no dry run)")
@pytest.mark.timeout(600)
def test_gpu_train_two_workers_writes_a_cuda_checkpoint(ray_local, idx_dir, nodes, tmp_path):
    """`--workers 2 --gpus 1`: two Ray Train workers, one GPU each (DDP over NCCL)."""
    nodes.add(num_cpus=2, num_gpus=2)  # one node: Ray hands the workers GPU ids 0 and 1
    training = _train_on_gpus(idx_dir, tmp_path / "ckpt", "--workers", "2")
    assert training["device"] == str(DEVICE) and training["workers"] == 2
