"""Adaptation throughput on a CUDA GPU (run by `scripts/gpu_check.sh`; needs no dataset).

    .venv/bin/python benchmarks/gpu_throughput.py [--samples 4096] [--batch 32] [--episodes 8]

Synthetic digit images (tests/helpers.py) -> shards (`make_shards`, gaussian_noise s5) and a
briefly trained TTT checkpoint (tests/jobs/adapt_fixtures.py), then samples/s for
  - sequential episodes: `engine.adapt(batch)` per batch of `--batch`, on cuda:0;
  - batched episodes: `engine.adapt_episodes(G batches)` (only if the engine has it;
    detected, not assumed), G = `--episodes`;
  - `ttt-pipe adapt` (run_adapt) with 1 and 2 Ray actors on the GPU(s) (2 actors share one
    GPU, 0.5 each, on a 1-GPU machine).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "jobs")]
os.environ.setdefault("MKL_CBWR", "AUTO")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    _sync(device)
    started = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - started


def main() -> None:
    from adapt_fixtures import train_tiny_checkpoint
    from helpers import write_dataset

    from jobs.adapt import AdaptRequest, run_adapt
    from pipeline.checkpoint import build_engine_from_checkpoint, load_checkpoint
    from pipeline.shard_maker import make_shards
    from pipeline.shards import list_shards, read_shard

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cpu", action="store_true", help="dry run of this script on the CPU")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_throughput: no CUDA GPU (--cpu for a dry run)")
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    write_dataset(work / "data" / "mnist", n_train=256, n_test=args.samples, gz=False, seed=0)
    make_shards("mnist", str(work / "shards"), "gaussian_noise", "5", data_dir=work / "data" / "mnist",
                identity=False, shard_size=512, seed=0)
    ckpt = train_tiny_checkpoint(work / "ckpt", work / "data", "ttt", epochs=1)
    shards = [read_shard(u) for u in list_shards(str(work / "shards"))]
    images = np.concatenate([np.asarray(s.images, dtype=np.float32) for s in shards])
    x = torch.from_numpy(images).to(device)
    n = (len(x) // (args.batch * args.episodes)) * args.batch * args.episodes
    batches = x[:n].reshape(-1, args.batch, *x.shape[1:])  # (N/B, B, C, H, W)
    engine = build_engine_from_checkpoint(load_checkpoint(ckpt), device)
    engine.eval()
    engine.adapt(batches[0], steps=args.steps)  # warm-up (cuDNN autotune, allocator)

    seq = _timed(lambda: [engine.adapt(b, steps=args.steps) for b in batches], device)
    print(f"sequential episodes (batch {args.batch}, {args.steps} steps): {n / seq:9.1f} samples/s")
    if hasattr(engine, "adapt_episodes"):
        groups = batches.reshape(-1, args.episodes, *batches.shape[1:])  # (N/(G*B), G, B, ...)
        engine.adapt_episodes(groups[0], steps=args.steps)
        bat = _timed(lambda: [engine.adapt_episodes(g, steps=args.steps) for g in groups], device)
        print(f"batched episodes (G {args.episodes}):            {n / bat:9.1f} samples/s "
              f"({seq / bat:.2f}x sequential)")
    else:
        print("batched episodes: this engine has no adapt_episodes; skipped")

    gpus = 0 if args.cpu else torch.cuda.device_count()
    for actors in (1, 2):
        per = 0.0 if args.cpu else (1.0 if gpus >= actors else 0.5)
        out = work / f"results-{actors}"
        outcome = run_adapt(AdaptRequest(ckpt, str(work / "shards"), str(out), actors=actors,
                                         gpus_per_actor=per, steps=args.steps, batch_size=args.batch))
        t = outcome.timings
        samples = sum(s.samples for s in outcome.plan.shards)
        devices = sorted({s["device"] for s in outcome.shard_summaries})
        print(f"ray, {actors} actor(s) x {per:g} GPU: {samples / t['dispatch_s']:9.1f} samples/s steady, "
              f"{samples / t['wall_s']:9.1f} end to end ({t['wall_s']:.1f}s) {devices}")
    print(f"work folder: {work}")


if __name__ == "__main__":
    main()
