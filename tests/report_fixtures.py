"""Synthetic results folders and shards for the report tests (plain pyarrow, known numbers)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.results import PREDICTION_SCHEMA, accuracy_table
from pipeline.shards import shard_name, write_shard

# (corruption, severity) of every shard in the synthetic run; identity first
SHARDS = [("identity", 0), ("gaussian_noise", 1), ("gaussian_noise", 5), ("fog", 3)]
N, BATCH, STEPS = 40, 8, 3


def clean_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Digit-ish strokes: label k draws a bar at an angle set by k, in pixel units [0, 1]."""
    labels = np.arange(n) % 10
    yy, xx = np.mgrid[0:28, 0:28] - 13.5
    images = np.zeros((n, 28, 28), np.float32)
    for i, k in enumerate(labels):
        angle = np.pi * k / 10
        d = np.abs(xx * np.sin(angle) - yy * np.cos(angle))
        ring = np.abs(np.hypot(xx, yy) - 9) < 1.5
        images[i] = np.clip((d < 2.0) * (np.hypot(xx, yy) < 11) + 0.6 * ring * (k % 2), 0, 1)
    return images, labels


def corrupt(images: np.ndarray, corruption: str, severity: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed + severity)
    if corruption == "identity":
        return images
    if corruption.endswith("noise"):
        return images + rng.normal(0, 0.15 * severity, images.shape).astype(np.float32)
    return 0.5 * images + 0.12 * severity  # fog and any other name: a haze


def write_shards(shard_dir: Path, shards=SHARDS, n: int = N, seed: int = 0) -> list[str]:
    """Real shards through pipeline.shards.write_shard (validated, contract schema)."""
    storage.makedirs(str(shard_dir))
    images, labels = clean_images(n)
    uris = []
    for corruption, severity in shards:
        uri = str(shard_dir / f"{shard_name(corruption, severity, 0)}.parquet")
        x = corrupt(images, corruption, severity)[:, None]  # (n, 1, 28, 28)
        write_shard(uri, np.arange(n, dtype=np.int64), labels.astype(np.int64), x.astype(np.float32),
                    corruption=corruption, severity=severity, dataset="synthetic",
                    mean=0.1307, std=0.3081, seed=seed)
        uris.append(uri)
    return uris


def is_correct(i: int, step: int, corruption: str, severity: int, offset: int = 0) -> bool:
    """Known pattern: a sample is right when its rank is below a threshold that rises with the
    step (by 1 + severity % 4 per step) and falls with the severity (identity: 36/40 at every step)."""
    if corruption == "identity":
        return (i + offset) % N < 36
    threshold = 30 - 3 * severity + (1 + severity % 4) * step + offset
    return (i * 7) % N < threshold


def predictions(shard: str, corruption: str, severity: int, method: str, steps: int = STEPS,
                n: int = N, offset: int = 0) -> pa.Table:
    rows = defaultdict(list)
    for i in range(n):
        for step in range(steps + 1):
            ok = is_correct(i, step, corruption, severity, offset)
            for key, value in (("sample_id", i), ("shard", shard), ("corruption", corruption),
                               ("severity", severity), ("method", method), ("step", step),
                               ("label", i % 10), ("pred", i % 10 if ok else (i + 3) % 10),
                               ("correct", ok), ("confidence", 0.9 if ok else 0.4),
                               ("batch", i // BATCH),
                               ("loss", float("nan") if step == steps else 1.0 / (step + 1))):
                rows[key].append(value)
    return pa.table(rows, schema=PREDICTION_SCHEMA)


def write_results(root: Path, shard_uris: list[str], method: str = "ttt", done=None,
                  offset: int = 0, steps: int = STEPS, settings: dict | None = None,
                  n: int = N, model: str | None = "demo-model") -> Path:
    """A results folder; `done` (shard names) limits which shards have predictions (partial);
    `model`: its run.json checkpoint.model_sha256 (None: a run.json from before that field)."""
    (root / "predictions").mkdir(parents=True, exist_ok=True)
    tables = []
    for uri in shard_uris:
        name = Path(uri).stem
        corruption, sev = name.rsplit("-", 1)[0].rsplit("-s", 1)
        if done is not None and name not in done:
            continue
        t = predictions(name, corruption, int(sev), method, steps=steps, offset=offset, n=n)
        pq.write_table(t, root / "predictions" / f"{name}.parquet")
        tables.append(t)
    if done is None:
        pq.write_table(accuracy_table(pa.concat_tables(tables)), root / "accuracy.parquet")
    checkpoint = {"uri": "/ckpt/demo"} if model is None else {"uri": "/ckpt/demo", "model_sha256": model}
    run = {"method": method, "steps": steps, "checkpoint": checkpoint, "shards": list(shard_uris),
           "batch_size": BATCH, "seed": 0}
    if settings is not None:  # as `ttt-pipe adapt` writes it: the resolved settings
        run["settings"] = {"method": method, "steps": steps, "mode": "episodic", **settings}
    (root / "run.json").write_text(json.dumps(run))
    return root


def expected_accuracy(corruption: str, severity: int, step: int, offset: int = 0, n: int = N) -> float:
    return sum(is_correct(i, step, corruption, severity, offset) for i in range(n)) / n


def counted_predictions(shard: str, corruption: str, severity: int, method: str,
                        correct: list[int], n: int) -> pa.Table:
    """Predictions where the first `correct[k]` samples (by id) are right at step k."""
    steps = len(correct)
    ids = np.repeat(np.arange(n), steps)
    step = np.tile(np.arange(steps), n)
    ok = ids < np.asarray(correct)[step]
    label = (ids % 10).astype(np.int16)
    return pa.table({
        "sample_id": ids.astype(np.int64), "shard": [shard] * len(ids),
        "corruption": [corruption] * len(ids), "severity": np.full(len(ids), severity, np.int8),
        "method": [method] * len(ids), "step": step.astype(np.int16), "label": label,
        "pred": np.where(ok, label, (label + 1) % 10).astype(np.int16), "correct": ok,
        "confidence": np.full(len(ids), 0.5, np.float32), "batch": (ids // BATCH).astype(np.int32),
        "loss": np.where(step == steps - 1, np.nan, 1.0).astype(np.float32)}, schema=PREDICTION_SCHEMA)


def write_counted(root: Path, method: str, cells: dict[tuple[str, int], list[int]], n: int,
                  mode: str = "episodic", model: str = "demo-model") -> Path:
    """A results folder with known correct counts per (corruption, severity) and step; its
    shards (named, not written) are `<corruption>-s<severity>-00000`."""
    (root / "predictions").mkdir(parents=True, exist_ok=True)
    names = []
    for (corruption, severity), correct in cells.items():
        name = shard_name(corruption, severity, 0)
        pq.write_table(counted_predictions(name, corruption, severity, method, correct, n),
                       root / "predictions" / f"{name}.parquet")
        names.append(name)
    steps = len(next(iter(cells.values()))) - 1
    run = {"settings": {"method": method, "steps": steps, "mode": mode},
           "checkpoint": {"uri": "/ckpt/demo", "model_sha256": model},
           "shards": [f"/nowhere/{name}.parquet" for name in names],
           "samples": {name: n for name in names}}
    (root / "run.json").write_text(json.dumps(run))
    return root


def write_cost(root: Path, shard: str, method: str, samples: int, adapt_s: float, actor: str,
               peak: int, base: int, memory: str = "cpu_max_rss") -> None:
    """A shard's cost sidecar as the actor writes it (pipeline.cost)."""
    record = {"shard": shard, "method": method, "samples": samples, "adapt_s": adapt_s,
              "actor": actor, "device": "cpu", "memory": memory, "peak_bytes": peak,
              "base_bytes": base}
    (root / "predictions" / f"{shard}.cost.json").write_text(json.dumps(record))
