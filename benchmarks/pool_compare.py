"""Dispatch loop (`jobs.pool.run_pool`) vs Ray Data's actor pool, same shards, same worker.

    .venv/bin/python benchmarks/pool_compare.py [--shards 16] [--shard-size 256] [--runs 3]

Both run `jobs.shard_worker.ShardWorker.process` on whole shards on a local Ray (started once):
  loop:     `run_pool` (actors created, then one shard per idle actor, `ray.wait`);
  ray-data: `ray.data.from_items(tasks).map_batches(Worker, batch_size=1,
            compute=ActorPoolStrategy(min_size=n, max_size=n), num_cpus=1)`.
Reported: wall seconds from the call to the last predictions file written (actor start
included), median over `--runs`, for 1 and 2 actors. Predictions must be byte-identical.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MKL_CBWR", "AUTO")

from adapt_throughput import DATA, make_checkpoint  # noqa: E402

from jobs.adapt import AdaptRequest, prepare_adapt  # noqa: E402
from jobs.pool import actor_env, plan_pool, run_pool  # noqa: E402
from jobs.shard_worker import ShardWorker  # noqa: E402
from pipeline.results import predictions_uri  # noqa: E402
from pipeline.shard_maker import make_shards  # noqa: E402


class _DataWorker:
    """Ray Data's callable-class UDF around the same ShardWorker."""

    def __init__(self, checkpoint, settings):
        self.worker = ShardWorker(checkpoint, settings, threads=1)

    def __call__(self, batch):
        for uri, out in zip(batch["uri"], batch["out"]):
            self.worker.process(str(uri), str(out))
        return {"uri": batch["uri"]}


def run_loop(plan, tasks, actors):
    pool = plan_pool({"cpus": 2, "gpus": 0}, len(tasks), actors, 1.0, 0.0)
    started = time.perf_counter()
    run_pool(plan.checkpoint, plan.settings, pool, tasks)
    return time.perf_counter() - started


def run_data(plan, tasks, actors):
    import ray
    from ray.data import ActorPoolStrategy

    started = time.perf_counter()
    ds = ray.data.from_items([{"uri": u, "out": o} for u, o in tasks])
    ds = ds.map_batches(_DataWorker, batch_size=1, compute=ActorPoolStrategy(min_size=actors, max_size=actors),
                        num_cpus=1, fn_constructor_kwargs={"checkpoint": plan.checkpoint.uri,
                                                           "settings": plan.settings},
                        runtime_env={"env_vars": actor_env()})
    done = ds.take_all()
    assert len(done) == len(tasks)
    return time.perf_counter() - started


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = args.work or Path(tempfile.mkdtemp(prefix="pool-bench-"))
    shards = work / "shards"
    if not shards.exists():
        make_shards("fashion-mnist", str(shards), "gaussian_noise", "5",
                    data_dir=DATA if os.path.isdir(DATA) else None, identity=False,
                    shard_size=args.shard_size, limit=args.shards * args.shard_size)
    ckpt = make_checkpoint(work / "checkpoint", 2000, DATA if os.path.isdir(DATA) else None)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": actor_env()})
    ray.data.DataContext.get_current().enable_progress_bars = False
    reference = None
    for actors in (1, 2):
        for name, fn in (("loop", run_loop), ("ray-data", run_data)):
            times = []
            for r in range(args.runs):
                out = work / f"{name}-{actors}-{r}"
                plan = prepare_adapt(AdaptRequest(ckpt, str(shards), str(out)))
                (out / "predictions").mkdir(parents=True)
                tasks = [(s.uri, predictions_uri(str(out), s.uri)) for s in plan.shards]
                times.append(fn(plan, tasks, actors))
                files = {p.name: p.read_bytes() for p in (out / "predictions").glob("*.parquet")}
                reference = reference or files
                assert files == reference, f"{name} {actors}: predictions differ"
            samples = args.shards * args.shard_size
            med = statistics.median(times)
            print(f"{name:<9} {actors} actor(s): median {med:6.2f}s ({samples / med:7.1f} samples/s) "
                  f"runs {[round(t, 2) for t in times]}  load {os.getloadavg()[0]:.1f}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
