"""A pool of Ray adaptation actors that takes whole shards, dynamically, until none are left.

Each actor is a `jobs.shard_worker.ShardWorker` (checkpoint loaded once in `__init__`)
created with `max_restarts=-1, max_task_retries=-1`: an actor that dies
mid-shard is restarted (re-running `__init__`) and the interrupted call is retried, which
rewrites the same predictions file with identical content. The driver hands the next shard to
whichever actor is idle (`ray.wait` loop), so a slow shard never holds up the others.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import ray
from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

from jobs.shard_worker import AdaptSettings, ShardWorker
from pipeline.checkpoint import Checkpoint
from pipeline.errors import TTTPipeError
from pipeline.model_spec import TRUST_ENV

__all__ = ["PoolPlan", "plan_pool", "run_pool", "actor_env"]

log = logging.getLogger(__name__)

_WAIT_S = 0.5  # ray.wait timeout: keeps the driver responsive to Ctrl-C


@dataclass(frozen=True)
class PoolPlan:
    """How many actors, what each one asks Ray for, and how many torch threads it uses."""

    actors: int
    num_cpus: float
    num_gpus: float
    threads: int


def plan_pool(resources: dict, tasks: int, actors: int | None, cpus_per_actor: float,
              gpus_per_actor: float) -> PoolPlan:
    """Size the pool to the cluster (`jobs.cluster.cluster_resources()`), before any actor starts.

    Default actor count: as many as fit (by CPUs, and by GPUs when asked for), at most one per
    shard. If the actors asked for do not fit in the cluster's CPUs, each asks for a fraction
    so the total fits (they then share cores); GPUs cannot be shared that way and fail fast.
    Threads per actor follow `cpus_per_actor`, never the actor count (see `jobs.adapt`).
    """
    cpus, gpus = float(resources.get("cpus", 0.0)), float(resources.get("gpus", 0.0))
    if cpus <= 0:
        raise TTTPipeError("the Ray cluster reports no CPUs; check `ray status` on the cluster")
    if actors is None:
        actors = max(1, math.floor(cpus / cpus_per_actor + 1e-9))
        if gpus_per_actor > 0:
            actors = min(actors, math.floor(gpus / gpus_per_actor + 1e-9))
    actors = max(1, min(actors, tasks))
    if gpus_per_actor > 0 and actors * gpus_per_actor > gpus + 1e-9:
        raise TTTPipeError(
            f"{actors} actor(s) x {gpus_per_actor:g} GPU need {actors * gpus_per_actor:g} GPUs but the "
            f"cluster has {gpus:g}; lower --actors or --gpus-per-actor (0 runs on CPU)")
    num_cpus = min(cpus_per_actor, cpus / actors)
    if num_cpus < cpus_per_actor:
        log.warning("%d actors x %g CPUs do not fit in %g CPUs: each asks for %.2f",
                    actors, cpus_per_actor, cpus, num_cpus)
    threads = max(1, math.floor(cpus_per_actor + 1e-9))
    return PoolPlan(actors=actors, num_cpus=num_cpus, num_gpus=gpus_per_actor, threads=threads)


def actor_env() -> dict[str, str]:
    """Environment of the adaptation actors.

    `MKL_CBWR=AUTO` (MKL's conditional numerical reproducibility; a value the user set wins):
    without it MKL's CPU kernels may pick code paths that differ from one process to the next
    (measured on an AMD EPYC: two distinct results over reruns of one shard), and Adam's
    sign-like first step turns last-bit differences into different predictions. It must be in
    the environment before MKL starts, hence a runtime_env and not code in the actor.
    """
    return {"MKL_CBWR": os.environ.get("MKL_CBWR", "AUTO")}


def _error_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if cause is not None:
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        return first
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def run_pool(checkpoint: Checkpoint, settings: AdaptSettings, plan: PoolPlan,
             tasks: Sequence[tuple[str, str]], on_done: Callable[[dict], None] | None = None,
             kill_marker: str | None = None, trusted: Sequence[str] = ()) -> dict:
    """Adapt every `(shard_uri, out_uri)` in `tasks` on a pool of actors (Ray must be up).

    Calls `on_done(summary)` in the driver as each shard finishes. Returns pool timings:
    `start_s` (actors created and checkpoint loaded), `dispatch_s` (from then until the last
    shard is written), `init_s` (per-actor `__init__` times) and `shards` (the per-shard
    summaries). Actors are killed on the way out, also on errors and
    Ctrl-C, after their in-flight calls have stopped.
    """
    started = time.perf_counter()
    env = actor_env()
    if trusted:
        env[TRUST_ENV] = ",".join(trusted)
    remote_cls = ray.remote(ShardWorker).options(
        num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, max_restarts=-1, max_task_retries=-1,
        runtime_env={"env_vars": env})
    device = "auto" if plan.num_gpus > 0 else "cpu"
    # Each actor loads (and sha-checks) the checkpoint itself, from storage every node reads:
    # a restarted actor needs nothing the driver still has to hold in the object store.
    handles = [remote_cls.remote(checkpoint.uri, settings, device=device, threads=plan.threads,
                                 kill_marker=kill_marker) for _ in range(plan.actors)]
    inflight: dict = {}
    summaries: list[dict] = []
    try:
        try:
            infos = ray.get([h.info.remote() for h in handles])
        except (RayActorError, RayTaskError) as exc:
            raise TTTPipeError(f"an adaptation actor failed to start: {_error_line(exc)}") from None
        start_s = time.perf_counter() - started
        log.info("%d actor(s) ready in %.1fs: %s", len(handles), start_s, infos)
        dispatch_started = time.perf_counter()
        queue = deque(tasks)
        idle = list(reversed(handles))
        while queue or inflight:
            while idle and queue:
                actor, task = idle.pop(), queue.popleft()
                inflight[actor.process.remote(*task)] = (actor, task)
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=_WAIT_S)
            for ref in ready:
                actor, task = inflight.pop(ref)
                try:
                    summary = ray.get(ref)
                except RayTaskError as exc:
                    raise TTTPipeError(f"adapting shard {task[0]} failed: {_error_line(exc)}") from None
                except (ActorDiedError, RayActorError) as exc:
                    raise TTTPipeError(
                        f"the actor adapting shard {task[0]} died and could not be restarted: "
                        f"{_error_line(exc)}; rerun the same command to resume") from None
                summaries.append(summary)
                idle.append(actor)
                if on_done is not None:
                    on_done(summary)
    finally:
        for h in handles:
            ray.kill(h, no_restart=True)
        if inflight:  # let killed calls settle so no actor still writes when we return
            ray.wait(list(inflight), num_returns=len(inflight), timeout=30)
    return {"start_s": start_s, "dispatch_s": time.perf_counter() - dispatch_started,
            "init_s": [i["init_seconds"] for i in infos], "shards": summaries}
