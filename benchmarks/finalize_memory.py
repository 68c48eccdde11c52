"""Driver memory of `finalize_results` as shards grow: it reads footers, never predictions.

    .venv/bin/python benchmarks/finalize_memory.py [--shards 100 1000 4000] [--shard-size 1000]

For each count, in a fresh subprocess: write that many synthetic predictions files (shard
size x (steps + 1) rows, with the footer summary an actor writes), then time
`finalize_results` and report the process's peak RSS growth during it and Arrow's peak
allocation. Target: peak flat (within 10 %) from the smallest to the largest count.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _one(shards: int, size: int, work: Path) -> dict:
    import numpy as np
    import pyarrow as pa

    from jobs.adapt import AdaptPlan, AdaptRequest, ShardInfo, finalize_results
    from jobs.shard_worker import SETTINGS_KEY, AdaptSettings
    from pipeline import storage
    from pipeline.results import PREDICTION_SCHEMA, SUMMARY_KEY, summarize_predictions

    settings = AdaptSettings(method="ttt", weights_sha256="0" * 64, steps=3, lr=1e-3, batch_size=32)
    steps = settings.steps + 1
    rng = np.random.default_rng(0)
    infos = []
    (work / "predictions").mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        name = f"gaussian_noise-s{1 + i % 5}-{i:05d}"
        rows = size * steps
        label = rng.integers(0, 10, rows).astype(np.int16)
        pred = rng.integers(0, 10, rows).astype(np.int16)
        cols = {"sample_id": np.tile(np.arange(size) + i * size, steps), "shard": [name] * rows,
                "corruption": ["gaussian_noise"] * rows, "severity": np.full(rows, 1 + i % 5, np.int8),
                "method": ["ttt"] * rows, "step": np.repeat(np.arange(steps), size).astype(np.int16),
                "label": label, "pred": pred, "correct": label == pred,
                "confidence": rng.random(rows, dtype=np.float32), "batch": np.zeros(rows, np.int32),
                "loss": np.zeros(rows, np.float32)}
        table = pa.Table.from_arrays([pa.array(cols[f.name], f.type) for f in PREDICTION_SCHEMA],
                                     schema=PREDICTION_SCHEMA)
        summary = summarize_predictions(table, name, steps)
        storage.atomic_write_table(table, str(work / "predictions" / f"{name}.parquet"), metadata={
            SETTINGS_KEY: settings.to_json(), SUMMARY_KEY: json.dumps(summary, sort_keys=True)})
        infos.append(ShardInfo(uri=f"/shards/{name}.parquet", name=name, corruption="gaussian_noise",
                               severity=1 + i % 5, samples=size, done=True))
    del table, cols
    plan = AdaptPlan(request=AdaptRequest("ckpt", "/shards", str(work)), checkpoint=None,
                     settings=settings, shards=infos)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_now = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    pool = pa.default_memory_pool()
    arrow_before = pool.max_memory()
    started = time.perf_counter()
    accuracy = finalize_results(plan)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"shards": shards, "rows": shards * size * steps, "finalize_s": seconds,
            "rss_kb_before": rss_now, "peak_growth_kb": max(0, after - max(before, rss_now)),
            "arrow_peak_mb": (pool.max_memory() - arrow_before) / 1e6,
            "groups": accuracy.num_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[100, 1000, 4000])
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(_one(args.one, args.shard_size, args.work)))
        return
    for n in args.shards:
        work = Path(tempfile.mkdtemp(prefix=f"finalize-{n}-"))
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--shard-size",
                              str(args.shard_size), "--work", str(work)],
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{r['shards']:6d} shards ({r['rows']:>11,} prediction rows): finalize {r['finalize_s']:6.2f}s "
              f"({1e3 * r['finalize_s'] / r['shards']:.2f} ms/shard), driver peak RSS growth "
              f"{r['peak_growth_kb'] / 1024:6.1f} MB, Arrow peak {r['arrow_peak_mb']:6.2f} MB "
              f"(RSS before {r['rss_kb_before'] / 1024:.0f} MB), load {os.getloadavg()[0]:.1f}", flush=True)
        subprocess.run(["rm", "-rf", str(work)], check=True)


if __name__ == "__main__":
    main()
