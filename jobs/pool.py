"""A pool of Ray adaptation actors that takes whole shards, dynamically, until none are left.

Each actor is a `jobs.shard_worker.ShardWorker` (checkpoint loaded once in `__init__`). The
driver hands the next shard to whichever actor is idle (`ray.wait` loop), so a slow shard
never holds up the others, and tells it the shard it gets after that, which the actor reads in
the background while it adapts (`ShardWorker.process(..., next_uri=)`).

Autoscaling (`--actors N` or `MIN:MAX`, `plan_pool`):
- the first MIN actors are created at once, also when their GPUs (or, on a cluster, CPUs)
  are not up yet: a pending actor is what makes Ray's autoscaler start a node. The driver
  logs that it waits, and starts handing out shards as soon as the FIRST actor is ready;
- while shards are queued and every actor is busy, the pool grows towards MAX: on a local
  Ray when a node with room joined (`ray.available_resources()`), on a cluster also ahead of
  the nodes (as many pending actors as there are ready ones: the request doubles);
- a node (or an actor) that goes away: the actor is created with `max_restarts=0`, so its
  in-flight shard fails at once instead of waiting for a restart, goes back to the FRONT of
  the queue for any other actor, and a replacement actor is requested. A shard that kills
  `MAX_ATTEMPTS` actors in a row fails the run with its name. A retried shard rewrites the
  same predictions file with identical content (see `jobs.shard_worker`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import ray
from ray.exceptions import RayActorError, RayTaskError

from jobs.shard_worker import AdaptSettings, ShardWorker
from pipeline.checkpoint import Checkpoint
from pipeline.errors import TTTPipeError
from pipeline.model_spec import TRUST_ENV

__all__ = ["PoolPlan", "parse_actors", "plan_pool", "run_pool", "actor_env", "MAX_ATTEMPTS",
           "unit_label"]

log = logging.getLogger(__name__)

_WAIT_S = 0.5      # ray.wait timeout: keeps the driver responsive to Ctrl-C
_NOTICE_S = 60.0   # while no actor is ready, say so this often
MAX_ATTEMPTS = 3   # actors a shard may kill (node lost, OOM, ...) before the run fails


@dataclass(frozen=True)
class PoolPlan:
    """How many actors (MIN..MAX), what each one asks Ray for, how many torch threads it runs.

    `actors` is MAX. `waits`: the cluster does not have the resources for MIN actors yet;
    they are requested and the autoscaler has to start nodes. `autoscale`: grow ahead of the
    nodes (a cluster); otherwise only into free resources (a local Ray).
    """

    actors: int
    num_cpus: float
    num_gpus: float
    threads: int
    min_actors: int = 0  # 0: same as `actors`
    waits: bool = False
    autoscale: bool = False

    def __post_init__(self):
        if not self.min_actors:
            object.__setattr__(self, "min_actors", self.actors)


def parse_actors(value) -> tuple[int | None, int | None]:
    """`None`, `N` or `"MIN:MAX"` (also `"N"`, `(MIN, MAX)`) -> (MIN, MAX); one-line errors."""
    if value is None:
        return None, None
    if isinstance(value, bool):
        raise TTTPipeError(f"--actors must be N or MIN:MAX with integers >= 1, got {value!r}")
    if isinstance(value, int):
        lo = hi = value
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        lo, hi = value
    elif isinstance(value, str) and value.strip():
        parts = value.strip().split(":")
        try:
            lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (None, None)
        except ValueError:
            lo = hi = None
    else:
        lo = hi = None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (lo, hi)) or lo > hi:
        raise TTTPipeError(f"--actors must be N or MIN:MAX with integers 1 <= MIN <= MAX, got {value!r}")
    return lo, hi


def plan_pool(resources: dict, tasks: int, actors, cpus_per_actor: float, gpus_per_actor: float,
              *, autoscale: bool = False) -> PoolPlan:
    """Size the pool (`jobs.cluster.cluster_resources()` as `resources`), before any actor starts.

    `actors`: `None` (as many as fit now, by CPUs and by GPUs when asked for; at least one),
    `N`, or `"MIN:MAX"`; never more than `tasks`. Actors that need GPUs the cluster does not
    have yet are planned anyway (`waits`): their requests make the autoscaler start nodes.
    CPUs: with `autoscale` (a cluster) the same; on a local Ray a fixed pool that does not fit
    in its CPUs asks for a fraction each so the total fits (they then share cores), and a
    growing pool grows only into free CPUs. Threads per actor follow `cpus_per_actor`, never
    the actor count (see `jobs.adapt`).
    """
    cpus, gpus = float(resources.get("cpus", 0.0)), float(resources.get("gpus", 0.0))
    if cpus <= 0 and not autoscale:
        raise TTTPipeError("the Ray cluster reports no CPUs; check `ray status` on the cluster")
    lo, hi = parse_actors(actors)
    if hi is None:
        hi = max(1, math.floor(cpus / cpus_per_actor + 1e-9))
        if gpus_per_actor > 0:
            hi = max(1, min(hi, math.floor(gpus / gpus_per_actor + 1e-9)))
        lo = hi
    hi = max(1, min(hi, tasks))
    lo = max(1, min(lo, hi))
    waits = gpus_per_actor > 0 and lo * gpus_per_actor > gpus + 1e-9
    num_cpus = cpus_per_actor
    if lo * cpus_per_actor > cpus + 1e-9:
        if autoscale:
            waits = True
        elif lo == hi:
            num_cpus = cpus / lo
            log.warning("%d actors x %g CPUs do not fit in %g CPUs: each asks for %.2f",
                        lo, cpus_per_actor, cpus, num_cpus)
        else:
            raise TTTPipeError(f"--actors {lo}:{hi} x {cpus_per_actor:g} CPUs: the minimum does not "
                               f"fit in this Ray's {cpus:g} CPUs; lower MIN or --cpus-per-actor")
    threads = max(1, math.floor(cpus_per_actor + 1e-9))
    return PoolPlan(actors=hi, min_actors=lo, num_cpus=num_cpus, num_gpus=gpus_per_actor,
                    threads=threads, waits=waits, autoscale=autoscale)


def actor_env() -> dict[str, str]:
    """Environment of the adaptation actors.

    `MKL_CBWR=AUTO` (MKL's conditional numerical reproducibility; a value the user set wins):
    without it MKL's CPU kernels may pick code paths that differ from one process to the next
    (measured on an AMD EPYC: two distinct results over reruns of one shard), and Adam's
    sign-like first step turns last-bit differences into different predictions. It must be in
    the environment before MKL starts, hence a runtime_env and not code in the actor.

    `TTT_PIPE_DATA` (where datasets are searched, e.g. EATA's clean Fisher images) is passed on
    when the driver has it: on a cluster the actors' processes do not inherit the driver's
    environment.
    """
    env = {"MKL_CBWR": os.environ.get("MKL_CBWR", "AUTO")}
    if os.environ.get("TTT_PIPE_DATA"):
        env["TTT_PIPE_DATA"] = os.environ["TTT_PIPE_DATA"]
    return env


def _error_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if cause is not None:
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        return first
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _init_error(exc: RayActorError) -> str:
    """The actor's own exception of `__init__`, one line (Ray's message wraps a traceback)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    own = [line for line in lines if line.split(":", 1)[0].endswith(("Error", "Exception"))
           and "creation task" not in line]
    return own[-1] if own else _error_line(exc)


def _fits_now(plan: PoolPlan) -> bool:
    free = ray.available_resources()
    return free.get("CPU", 0.0) + 1e-9 >= plan.num_cpus and free.get("GPU", 0.0) + 1e-9 >= plan.num_gpus


class _Pool:
    """The driver's bookkeeping: actors starting, idle and busy; the queue; retries."""

    def __init__(self, checkpoint: Checkpoint, settings: AdaptSettings, plan: PoolPlan,
                 tasks: Sequence[tuple], kill_marker: str | None,
                 trusted: Sequence[str] = (), save_adapted: str | None = None, stream=None):
        self.plan = plan
        env = actor_env()
        if trusted:  # model modules the user trusted on the command line (see model_spec)
            env[TRUST_ENV] = ",".join(trusted)
        self.remote_cls = ray.remote(ShardWorker).options(
            num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, max_restarts=0,
            runtime_env={"env_vars": env})
        device = "auto" if plan.num_gpus > 0 else "cpu"
        # Each actor loads (and sha-checks) the checkpoint itself, from storage every node
        # reads: a replacement actor needs nothing the driver still has to hold.
        self.args = (checkpoint.uri, settings)
        self.kwargs = dict(device=device, threads=plan.threads, kill_marker=kill_marker)
        if save_adapted:
            self.kwargs["save_adapted"] = save_adapted
        if stream is not None:  # pipeline.streams.StreamSettings
            self.kwargs["stream"] = stream
        self.queue = deque(tasks)
        self.live: list = []          # actors not known to be dead
        self.starting: dict = {}      # info() ref -> actor, until it is ready
        self.idle: list = []
        self.inflight: dict = {}      # process() ref -> (actor, task)
        self.ahead: dict = {}         # actor -> the task it prefetches, handed to it next
        self.attempts: Counter = Counter()
        self.infos: list[dict] = []
        self.retried: list[str] = []
        self.started = 0

    def spawn(self) -> None:
        actor = self.remote_cls.remote(*self.args, **self.kwargs)
        self.live.append(actor)
        self.starting[actor.info.remote()] = actor
        self.started += 1

    def grow(self) -> None:
        """Replace dead actors up to MIN; towards MAX while shards wait for a busy pool."""
        while len(self.live) < self.plan.min_actors:
            self.spawn()
        backlog = len(self.queue) - len(self.idle)
        if backlog <= 0 or len(self.live) >= self.plan.actors:
            return
        ready = len(self.live) - len(self.starting)
        if self.plan.autoscale and len(self.starting) < max(1, ready):
            self.spawn()  # a request ahead of the nodes: the autoscaler starts one for it
        elif not self.starting and _fits_now(self.plan):
            self.spawn()  # a node with room joined

    def dispatch(self) -> None:
        """Each idle actor gets its prefetched shard, else the queue's next; and a next one."""
        waiting = []
        while self.idle:
            actor = self.idle.pop()
            task = self.ahead.pop(actor, None) or (self.queue.popleft() if self.queue else None)
            if task is None:
                waiting.append(actor)  # nothing for it now (a retried shard may come back)
                continue
            nxt = self.queue.popleft() if self.queue else None
            if nxt is not None:
                self.ahead[actor] = nxt
            ref = actor.process.remote(*task, next_uri=nxt[0] if nxt else None)
            self.inflight[ref] = (actor, task)
        self.idle = waiting[::-1]

    def lost(self, actor, task, exc: BaseException) -> None:
        """`actor` died (its node left, OOM, killed): its shards go back to the front."""
        if actor in self.live:
            self.live.remove(actor)
        if actor in self.idle:
            self.idle.remove(actor)
        back = self.ahead.pop(actor, None)
        if back is not None:
            self.queue.appendleft(back)
        if task is None:
            return
        self.attempts[task] += 1
        if self.attempts[task] >= MAX_ATTEMPTS:
            raise TTTPipeError(
                f"{unit_label(task[0])} was being adapted by {MAX_ATTEMPTS} actors that died "
                f"({_error_line(exc)}); check memory and `ray status`, then rerun to resume")
        log.warning("the actor adapting %s died (%s); it goes to another actor",
                    unit_label(task[0]), _error_line(exc))
        self.retried.append(task[0] if isinstance(task[0], str) else task[0].name)
        self.queue.appendleft(task)

    def shutdown(self) -> None:
        for actor in self.live:
            ray.kill(actor, no_restart=True)
        if self.inflight:  # let killed calls settle so no actor still writes when we return
            ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=30)


def unit_label(unit) -> str:
    """`shard <uri>` or `stream <name>`: a unit of work in messages."""
    return f"shard {unit}" if isinstance(unit, str) else f"stream {unit.name}"


def run_pool(checkpoint: Checkpoint, settings: AdaptSettings, plan: PoolPlan,
             tasks: Sequence[tuple], on_done: Callable[[dict], None] | None = None,
             kill_marker: str | None = None, trusted: Sequence[str] = (),
             save_adapted: str | None = None, stream=None) -> dict:
    """Adapt every `(shard_uri, out_uri)` in `tasks` on a pool of actors (Ray must be up).

    A task's unit may also be a `pipeline.streams.StreamUnit` (`--stream`): one actor runs it
    from start to end, like a shard.

    Calls `on_done(summary)` in the driver as each shard finishes. Returns pool timings:
    `start_s` (until the first actor was ready), `dispatch_s` (from then until the last shard
    is written), `init_s` (per-actor `__init__` times), `actors` (how many became ready),
    `retried` (shards whose actor died) and `shards` (the per-shard summaries). Actors are
    killed on the way out, also on errors and Ctrl-C, after their in-flight calls stopped.
    """
    started = time.perf_counter()
    pool = _Pool(checkpoint, settings, plan, tasks, kill_marker, trusted, save_adapted, stream)
    pool.grow()  # the first MIN actors: requested (pending ones make the autoscaler add nodes)
    if plan.waits:
        log.warning("waiting for %d actor(s) x %g GPU(s), %g CPU(s) that the cluster does not have "
                    "yet; the autoscaler may need minutes to start nodes (Ctrl-C stops)",
                    plan.min_actors, plan.num_gpus, plan.num_cpus)
    summaries: list[dict] = []
    start_s, dispatch_started, notice = None, None, started + _NOTICE_S
    try:
        while pool.queue or pool.inflight or pool.ahead:
            pool.grow()
            pool.dispatch()
            refs = [*pool.inflight, *pool.starting]
            ready = ray.wait(refs, num_returns=1, timeout=_WAIT_S)[0] if refs else []
            if start_s is None and time.perf_counter() > notice:
                log.warning("still waiting for the first actor (%d requested); see `ray status`",
                            len(pool.starting))
                notice += _NOTICE_S
            for ref in ready:
                if ref in pool.starting:
                    actor = pool.starting.pop(ref)
                    try:
                        pool.infos.append(ray.get(ref))
                    except RayActorError as exc:
                        if exc.actor_init_failed:
                            raise TTTPipeError(
                                f"an adaptation actor failed to start: {_init_error(exc)}") from None
                        pool.lost(actor, None, exc)  # its node went away while it started
                        continue
                    if start_s is None:
                        start_s = time.perf_counter() - started
                        dispatch_started = time.perf_counter()
                        log.info("first actor ready in %.1fs: %s", start_s, pool.infos[-1])
                    pool.idle.append(actor)
                    continue
                actor, task = pool.inflight.pop(ref)
                try:
                    summary = ray.get(ref)
                except RayTaskError as exc:
                    raise TTTPipeError(f"adapting {unit_label(task[0])} failed: {_error_line(exc)}") from None
                except RayActorError as exc:
                    pool.lost(actor, task, exc)
                    continue
                summaries.append(summary)
                pool.idle.append(actor)
                if on_done is not None:
                    on_done(summary)
    finally:
        pool.shutdown()
    if start_s is None:  # nothing was pending
        start_s, dispatch_started = time.perf_counter() - started, time.perf_counter()
    return {"start_s": start_s, "dispatch_s": time.perf_counter() - dispatch_started,
            "init_s": [i["init_seconds"] for i in pool.infos], "actors": len(pool.infos),
            "retried": pool.retried, "shards": summaries}
