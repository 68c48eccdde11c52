"""Throughput of `ttt-pipe adapt`: the in-process engine loop vs Ray with 1 and 2 actors.

    .venv/bin/python benchmarks/adapt_throughput.py [--shards 4] [--shard-size 500] [--work DIR]

Same shards for all three (Fashion-MNIST test split, gaussian_noise severity 5, made with
`pipeline.shard_maker.make_shards`) and the same briefly trained TTT checkpoint, adapted with
the checkpoint's defaults (3 Adam steps, batch 32, episodic):

  (a) in-process: one `ShardWorker` (1 torch thread, like one actor) does every shard in turn;
  (b) `run_adapt(actors=1)` on a local Ray started for it;
  (c) `run_adapt(actors=2)`.

Samples/s are reported end to end (wall time of the whole call: Ray start, actors, read, adapt,
write, accuracy) and steady-state (actors up until the last shard is written, "dispatch").
Targets: b/a >= 0.8 and c/b >= 1.6 (steady state). The machine may be shared: the load
average is printed beside every number.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MKL_CBWR", "AUTO")  # as the actors (jobs.pool.actor_env): reproducible MKL

import torch  # noqa: E402

from jobs.adapt import AdaptRequest, prepare_adapt, run_adapt  # noqa: E402
from jobs.shard_worker import ShardWorker  # noqa: E402
from pipeline.checkpoint import save_checkpoint  # noqa: E402
from pipeline.datasets import load_split, to_float  # noqa: E402
from pipeline.shard_maker import make_shards  # noqa: E402

DATA = "/usr/share/datasets/fashion-mnist"


def load() -> str:
    return "load %.1f" % os.getloadavg()[0]


def make_checkpoint(out: Path, limit: int, data_dir: str | None) -> str:
    """TTT on seed_cnn, one short epoch of joint training on `limit` train images."""
    import engines
    from pipeline.models import build_model

    if (out / "manifest.json").exists():
        return str(out)
    split = load_split("fashion-mnist", "train", data_dir=data_dir)
    torch.manual_seed(0)
    spec = split.spec
    model = build_model("seed_cnn", mean=spec.mean[0], std=spec.std[0])
    config = engines.TTTConfig()
    engine = engines.TTTEngine(model, torch.zeros(1, 1, 28, 28), config)
    x, y = torch.from_numpy(to_float(split.images[:limit])), torch.from_numpy(split.labels[:limit])
    opt = torch.optim.Adam(engine.parameters(), lr=config.train_lr)
    started = time.perf_counter()
    engine.train()
    for i in range(0, limit, config.train_batch_size):
        loss, _, _ = engine.joint_loss(x[i:i + config.train_batch_size], y[i:i + config.train_batch_size])
        opt.zero_grad()
        loss.backward()
        opt.step()
    engine.eval()
    save_checkpoint(str(out), engine.state_dict(), {
        "model": {"name": "seed_cnn", "kwargs": {"mean": spec.mean[0], "std": spec.std[0]}},
        "method": {"name": "ttt", "config": config.to_dict()},
        "dataset": {"name": "fashion-mnist", "mean": spec.mean[0], "std": spec.std[0], "num_classes": 10},
        "training": {"epochs": 1, "batch_size": config.train_batch_size, "lr": config.train_lr,
                     "seed": 0, "limit": limit, "metrics": [],
                     "seconds": time.perf_counter() - started}})
    return str(out)


def in_process(ckpt: str, shards: str, out: Path, threads: int) -> dict:
    plan = prepare_adapt(AdaptRequest(ckpt, shards, str(out)))
    before = torch.get_num_threads()
    started = time.perf_counter()
    worker = ShardWorker(ckpt, plan.settings, threads=threads)
    init_s = time.perf_counter() - started
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    parts = {"read_s": 0.0, "adapt_s": 0.0, "write_s": 0.0}
    loop = time.perf_counter()
    for s in plan.shards:
        summary = worker.process(s.uri, str(out / "predictions" / f"{s.name}.parquet"))
        for k in parts:
            parts[k] += summary[k]
    loop_s = time.perf_counter() - loop
    torch.set_num_threads(before)
    samples = sum(s.samples for s in plan.shards)
    return {"samples": samples, "wall_s": time.perf_counter() - started, "steady_s": loop_s,
            "checkpoint_load_s": init_s, **parts}


def on_ray(ckpt: str, shards: str, out: Path, actors: int) -> dict:
    outcome = run_adapt(AdaptRequest(ckpt, shards, str(out), actors=actors))
    t = outcome.timings
    samples = sum(s.samples for s in outcome.plan.shards)
    return {"samples": samples, "wall_s": t["wall_s"], "steady_s": t["dispatch_s"],
            "ray_start_s": t["connect_s"], "actors_up_s": t["pool_start_s"],
            "checkpoint_load_s": max(t["actor_init_s"]), "shutdown_s": t["shutdown_s"],
            "read_s": t["read_s"], "adapt_s": t["adapt_s"], "write_s": t["write_s"]}


def show(name: str, r: dict, note: str) -> None:
    parts = ", ".join(f"{k[:-2]} {v:.2f}s" for k, v in r.items() if k.endswith("_s")
                      and k not in ("wall_s", "steady_s"))
    print(f"{name:<22} {r['samples'] / r['wall_s']:8.1f} samples/s end-to-end ({r['wall_s']:.1f}s)  "
          f"{r['samples'] / r['steady_s']:8.1f} samples/s steady ({r['steady_s']:.1f}s)  [{note}]")
    print(f"{'':<22} where the time goes: {parts}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--train-limit", type=int, default=4000)
    parser.add_argument("--work", type=Path, default=None, help="keep shards/checkpoint here")
    parser.add_argument("--data-dir", default=DATA if os.path.isdir(DATA) else None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = args.work or Path(tempfile.mkdtemp(prefix="adapt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    shards = work / "shards"
    if not shards.exists():
        make_shards("fashion-mnist", str(shards), "gaussian_noise", "5", data_dir=args.data_dir,
                    identity=False, shard_size=args.shard_size, limit=args.shards * args.shard_size)
    ckpt = make_checkpoint(work / "checkpoint", args.train_limit, args.data_dir)
    for run in ("a", "b", "c"):
        shutil.rmtree(work / run, ignore_errors=True)
    print(f"{args.shards} shards x {args.shard_size} samples (fashion-mnist gaussian_noise s5), "
          f"TTT defaults; {os.cpu_count()} CPUs; {load()}")
    a = in_process(ckpt, str(shards), work / "a", threads=1)
    show("(a) in-process, 1 thr", a, load())
    b = on_ray(ckpt, str(shards), work / "b", actors=1)
    show("(b) Ray, 1 actor", b, load())
    c = on_ray(ckpt, str(shards), work / "c", actors=2)
    show("(c) Ray, 2 actors", c, load())
    for run in ("b", "c"):
        for p in sorted((work / "a" / "predictions").glob("*.parquet")):
            same = (work / run / "predictions" / p.name).read_bytes() == p.read_bytes()
            if not same:
                print(f"WARNING: ({run}) predictions of {p.name} differ from (a)")

    def ratio(x, y, key):
        return (x["samples"] / x[key]) / (y["samples"] / y[key])

    print(f"b/a steady {ratio(b, a, 'steady_s'):.0%} (target >= 80%), end-to-end "
          f"{ratio(b, a, 'wall_s'):.0%}")
    print(f"c/b steady {ratio(c, b, 'steady_s'):.2f}x (target >= 1.6x), end-to-end "
          f"{ratio(c, b, 'wall_s'):.2f}x")
    print(f"work folder: {work}")


if __name__ == "__main__":
    main()
