"""`jobs.corrupt`: shards written by Ray tasks equal the in-process ones byte for byte; a
failing task removes everything the run wrote."""

from __future__ import annotations

import os
import sys

from ray import cloudpickle
import pytest

from jobs.corrupt import run_corrupt, run_tasks
from pipeline.errors import TTTPipeError
from pipeline.shard_maker import make_shards, plan_make, remove_written, write_task

ARGS = dict(corruptions="gaussian_noise,fog,rotate", severities="2,5", shard_size=10, limit=25,
            seed=4)


def _bytes(folder) -> dict[str, bytes]:
    return {p: open(os.path.join(folder, p), "rb").read() for p in sorted(os.listdir(folder))}


@pytest.mark.ray
def test_ray_job_is_byte_identical_to_in_process_and_parallel(ray_local, idx_dir, tmp_path):
    local = make_shards("mnist", str(tmp_path / "local"), data_dir=idx_dir / "mnist", **ARGS)
    seen = []
    plan = plan_make("mnist", str(tmp_path / "ray"), data_dir=idx_dir / "mnist", **ARGS)
    result = run_corrupt(plan, cpus_per_task=0.5, progress=lambda d, t, u: seen.append((d, t)))
    assert result["summary"].shards == [t.uri for t in plan.tasks]
    assert len(plan.tasks) == 3 * 7 and seen[-1] == (21, 21)
    assert _bytes(tmp_path / "ray") == _bytes(tmp_path / "local")
    # a single task at a time gives the same bytes again
    plan = plan_make("mnist", str(tmp_path / "one"), data_dir=idx_dir / "mnist", **ARGS)
    run_tasks(write_task, plan, plan.tasks, remove=remove_written, cpus_per_task=2.0)
    assert _bytes(tmp_path / "one") == _bytes(tmp_path / "local")


def _failing_write(plan, task):
    if task.corruption == "rotate" and task.severity == 5 and task.lo == 10:
        raise TTTPipeError("disk on fire")
    return write_task(plan, task)


@pytest.mark.ray
def test_failing_task_removes_what_the_run_wrote(ray_local, idx_dir, tmp_path):
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not on the workers' path
    try:
        out = tmp_path / "out"
        plan = plan_make("mnist", str(out), data_dir=idx_dir / "mnist", **ARGS)
        with pytest.raises(TTTPipeError) as err:
            run_tasks(_failing_write, plan, plan.tasks, remove=remove_written, cpus_per_task=0.5)
        assert "rotate-s5-00001.parquet failed: disk on fire" in str(err.value)
        assert "\n" not in str(err.value)
        assert not out.exists()  # created by this run: gone with its files
        # an existing folder with the user's files: only ours go
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        plan = plan_make("mnist", str(out), data_dir=idx_dir / "mnist", **ARGS)
        with pytest.raises(TTTPipeError, match="disk on fire"):
            run_tasks(_failing_write, plan, plan.tasks, remove=remove_written, cpus_per_task=0.5)
        assert os.listdir(out) == ["keep.txt"]
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.mark.ray
def test_cpus_per_task_is_checked(ray_local, idx_dir, tmp_path):
    plan = plan_make("mnist", str(tmp_path / "o"), data_dir=idx_dir / "mnist", **ARGS)
    with pytest.raises(TTTPipeError, match="more than the cluster's"):
        run_corrupt(plan, cpus_per_task=64)
    assert not (tmp_path / "o").exists()
