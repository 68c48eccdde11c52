"""`ttt-pipe corrupt` and `ttt-pipe import-corrupted` as Ray jobs: one Ray task per shard file.

The driver plans (validates everything, lists the files; `pipeline.shard_maker.plan_make` or
`pipeline.import_corrupted.plan_import`), then runs every file as a Ray task with a fractional
CPU (`cpus_per_task`, default 1; 0.5 runs two per core), at most `max_inflight` at a time so
that memory stays bounded (a task holds one shard). Tasks read their own rows from the data,
write their file atomically and return only a small summary: the driver never holds pixels.

A file depends only on its task, so the same arguments give byte-identical files whatever the
parallelism or the order tasks finish in. On any failure (a task error, Ctrl-C) pending tasks
are cancelled, running ones are waited for, and every file this run wrote or was writing is
removed (`remove_written`); the error is one line naming the file.

Local Ray by default (`jobs.cluster.connect`), `address` for a running cluster (every node must
then read the data and write the output folder: shared or object storage).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError, TaskCancelledError, WorkerCrashedError

from jobs.cluster import connect
from jobs.pool import actor_env
from pipeline.errors import TTTPipeError

__all__ = ["run_tasks", "run_corrupt", "run_import"]

log = logging.getLogger(__name__)

_WAIT_S = 1.0

Progress = Callable[[int, int, str], None]  # (files done, files total, uri just written)


def _error_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    text = str(cause if cause is not None else exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0]


def _run_one(write: Callable[[Any, Any], dict], plan, task) -> dict:
    return write(plan, task)


def run_tasks(write: Callable[[Any, Any], dict], plan, tasks: Sequence, *,
              remove: Callable[[Any, list[str]], None], cpus_per_task: float = 1.0,
              max_inflight: int | None = None, progress: Progress | None = None) -> list[dict]:
    """Run `write(plan, task)` for every task as Ray tasks (Ray must be up); the summaries in
    task order. On failure `remove(plan, uris)` undoes the run and a TTTPipeError is raised."""
    if not cpus_per_task > 0:
        raise TTTPipeError(f"--cpus-per-task must be > 0, got {cpus_per_task!r}")
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    if cpus_per_task > cpus:
        raise TTTPipeError(f"--cpus-per-task {cpus_per_task:g} is more than the cluster's "
                           f"{cpus:g} CPUs; pass a smaller value")
    window = max_inflight or max(1, int(cpus / cpus_per_task) * 2)
    remote = ray.remote(_run_one).options(num_cpus=cpus_per_task, max_retries=0,
                                          runtime_env={"env_vars": actor_env()})
    plan_ref = ray.put(plan)  # small: specs and file names, never pixels
    queue = list(enumerate(tasks))[::-1]
    inflight: dict = {}
    results: dict[int, dict] = {}
    started: list[str] = []
    try:
        while queue or inflight:
            while queue and len(inflight) < window:
                index, task = queue.pop()
                started.append(task.uri)
                inflight[remote.remote(write, plan_ref, task)] = (index, task)
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=_WAIT_S)
            for ref in ready:
                index, task = inflight.pop(ref)
                try:
                    results[index] = ray.get(ref)
                except RayTaskError as exc:
                    raise TTTPipeError(f"writing {task.uri} failed: {_error_line(exc)}") from None
                except (WorkerCrashedError, RayActorError) as exc:
                    raise TTTPipeError(f"the worker writing {task.uri} died: {_error_line(exc)}; "
                                       "rerun the same command") from None
                if progress is not None:
                    progress(len(results), len(tasks), task.uri)
    except BaseException:
        for ref in inflight:
            ray.cancel(ref)  # pending ones never start; running ones are interrupted
        if inflight:  # let them stop: nothing may still write once we remove files
            try:
                ray.wait(list(inflight), num_returns=len(inflight), timeout=60)
            except (TaskCancelledError, RayTaskError):
                pass
        remove(plan, started)
        raise
    return [results[i] for i in range(len(tasks))]


def run_corrupt(plan, *, address: str | None = None, cpus_per_task: float = 1.0,
                progress: Progress | None = None) -> dict:
    """Write every shard of a `pipeline.shard_maker.MakePlan` on Ray; timings and the summary."""
    from pipeline.shard_maker import write_task

    return _run_plan(write_task, plan, address, cpus_per_task, progress)


def run_import(plan, *, address: str | None = None, cpus_per_task: float = 1.0,
               progress: Progress | None = None) -> dict:
    """Write every shard of a `pipeline.shard_import.ImportPlan` on Ray; timings and summary."""
    from pipeline.shard_import import write_import_task

    return _run_plan(write_import_task, plan, address, cpus_per_task, progress)


def _run_plan(task_fn, plan, address: str | None, cpus_per_task: float,
              progress: Progress | None) -> dict:
    from pipeline.shard_maker import remove_written

    t0 = time.perf_counter()
    try:
        with connect(address):
            t1 = time.perf_counter()
            run_tasks(task_fn, plan, plan.tasks, remove=remove_written,
                      cpus_per_task=cpus_per_task, progress=progress)
    except BaseException:
        remove_written(plan, [])  # e.g. no cluster: the (empty) folder, if this run made it
        raise
    t2 = time.perf_counter()
    return {"summary": plan.summary(), "connect_s": t1 - t0, "write_s": t2 - t1}
