"""Report speed at full scale: 10k test samples x (15 corruptions x 5 severities + identity)
x 4 steps = 3.04M prediction rows. Usage: .venv/bin/python benchmarks/report_speed.py [DIR]"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import report_fixtures as rf  # noqa: E402

from pipeline.report import build_report  # noqa: E402
from pipeline.results import PREDICTION_SCHEMA, read_results  # noqa: E402

CORRUPTIONS = ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
               "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
               "elastic", "pixelate", "jpeg"]
N, STEPS, BATCH = 10_000, 3, 256


def main(root: Path) -> None:
    shards = [("identity", 0)] + [(c, s) for c in CORRUPTIONS for s in range(1, 6)]
    uris = rf.write_shards(root / "shards", shards=shards, n=256)  # the report only peeks
    (root / "res" / "predictions").mkdir(parents=True)
    rng = np.random.default_rng(0)
    sid = np.repeat(np.arange(N), STEPS + 1)
    step = np.tile(np.arange(STEPS + 1), N)
    for (c, s), uri in zip(shards, uris):
        p = 0.95 if c == "identity" else 0.9 - 0.08 * s + 0.03 * step
        t = pa.table({"sample_id": sid, "shard": [Path(uri).stem] * len(sid),
                      "corruption": [c] * len(sid), "severity": np.full(len(sid), s, np.int8),
                      "method": ["ttt"] * len(sid), "step": step.astype(np.int16),
                      "label": (sid % 10).astype(np.int16), "pred": (sid % 10).astype(np.int16),
                      "correct": rng.random(len(sid)) < p,
                      "confidence": np.full(len(sid), 0.5, np.float32),
                      "batch": (sid // BATCH).astype(np.int32),
                      "loss": np.full(len(sid), 0.1, np.float32)}, schema=PREDICTION_SCHEMA)
        pq.write_table(t, root / "res" / "predictions" / f"{Path(uri).stem}.parquet")
    (root / "res" / "run.json").write_text(json.dumps({"method": "ttt", "steps": STEPS, "shards": uris}))
    t0 = time.perf_counter()
    rows = read_results(str(root / "res")).predictions.num_rows
    t1 = time.perf_counter()
    summary = build_report([str(root / "res")], fmt="csv")
    t2 = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"prediction rows {rows:,}  read_results {t1 - t0:.1f}s  build_report {t2 - t1:.1f}s  "
          f"files {len(summary.files)}  max RSS {rss:.0f} MiB")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
