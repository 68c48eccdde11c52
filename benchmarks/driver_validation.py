"""Driver-side validation of `ttt-pipe adapt` at 10,000 shards: footers only, no pixels.

Writes N tiny shards (8 rows of 3x16x16 uint8 each, real shard files through the v2 schema),
then runs `jobs.adapt.prepare_adapt` (what the driver does before Ray starts) in a fresh
process for 100 and for 10,000 shards and prints the validation time per shard and the
process's peak RSS. Targets (issue 14): <= 2 ms per shard, peak RSS at 10,000 shards within
10 % of the 100-shard run.

Usage: PYTHONPATH=. .venv/bin/python benchmarks/driver_validation.py [--shards 10000] [DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROWS, SHAPE = 8, (3, 16, 16)


def write_shards(folder: Path, count: int) -> None:
    from pipeline import storage
    from pipeline.shards import shard_metadata, shard_table

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    meta = shard_metadata(dataset="cifar10", image_shape=SHAPE, image_dtype="uint8",
                          mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), seed=0,
                          corruption="gaussian_noise", severity=5, suite="imagenet-c")
    for i in range(count):
        name = f"gaussian_noise-s5-{i:05d}"
        images = rng.integers(0, 256, (ROWS, *SHAPE), dtype=np.uint8)
        table = shard_table(np.arange(i * ROWS, (i + 1) * ROWS), np.zeros(ROWS, np.int64), images,
                            name=name, corruption="gaussian_noise", severity=5, metadata=meta)
        # plain write (no fsync) to keep the set-up short; the bytes are what write_shard writes
        pq.write_table(table, folder / f"{name}.parquet", **storage.PARQUET_OPTIONS)


def write_checkpoint(path: Path) -> None:
    import torch

    import engines
    from pipeline.checkpoint import save_checkpoint
    from pipeline.models import build_model

    kwargs = {"mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26], "num_classes": 10,
              "in_channels": 3, "image_size": list(SHAPE[1:])}
    torch.manual_seed(0)
    engine = engines.get_engine("ttt")(build_model("seed_cnn", **kwargs), torch.zeros(1, *SHAPE))
    manifest = {"model": {"name": "seed_cnn", "kwargs": kwargs},
                "method": {"name": "ttt", "config": engine.config.to_dict()},
                "dataset": {"name": "cifar10", "mean": kwargs["mean"], "std": kwargs["std"],
                            "num_classes": 10, "image_shape": list(SHAPE)},
                "training": {"epochs": 0, "batch_size": 1, "lr": 1e-3, "seed": 0, "limit": None,
                             "metrics": [], "seconds": 0.0}}
    save_checkpoint(str(path), engine.state_dict(), manifest)


def measure(checkpoint: Path, shards: str, out: Path) -> dict:
    """Run prepare_adapt in a fresh process; its validation time and peak RSS."""
    code = f"""
import json, resource, time
from jobs.adapt import AdaptRequest, prepare_adapt
t = time.perf_counter()
plan = prepare_adapt(AdaptRequest({str(checkpoint)!r}, {shards!r}, {str(out)!r}))
seconds = time.perf_counter() - t
print(json.dumps({{"shards": len(plan.shards), "validate_s": plan.validate_s, "seconds": seconds,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", help="work folder (default: a temporary one)")
    parser.add_argument("--shards", type=int, default=10_000)
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="driver_validation_"))
    big, small = root / "shards", root / "shards_100"
    t = time.perf_counter()
    if not big.exists():
        write_shards(big, args.shards)
    if not small.exists():
        write_shards(small, 100)
    if not (root / "ckpt").exists():
        write_checkpoint(root / "ckpt")
    print(f"set-up: {args.shards} + 100 shards in {time.perf_counter() - t:.1f} s under {root}")
    rows = {}
    for label, folder in (("100", small), (str(args.shards), big)):
        measure(root / "ckpt", str(folder), root / f"out_{label}")  # warm the page cache
        rows[label] = measure(root / "ckpt", str(folder), root / f"out_{label}")
    base, top = rows["100"], rows[str(args.shards)]
    for label, r in rows.items():
        print(f"{label:>6} shards: validation {r['validate_s']:.2f} s = "
              f"{1000 * r['validate_s'] / r['shards']:.3f} ms/shard, peak RSS {r['peak_rss_mb']:.1f} MB")
    print(f"peak RSS {args.shards} vs 100 shards: {top['peak_rss_mb'] / base['peak_rss_mb']:.3f}x "
          f"(target <= 1.10); ms/shard {1000 * top['validate_s'] / top['shards']:.3f} (target <= 2)")


if __name__ == "__main__":
    main()
