"""The results folder: prediction and accuracy schemas, the accuracy aggregation, reading.

A results folder (local path or `s3://...` URI) holds

    predictions/<shard>.parquet   one row per (sample, step), PREDICTION_SCHEMA
    accuracy.parquet              one row per (method, corruption, severity, step), ACCURACY_SCHEMA
    run.json                      the resolved run config; `shards` lists every shard URI asked for

A shard is done when `predictions/<shard>.parquet` exists (written atomically), so a folder
of a run still going, or interrupted, is readable: `read_results` names the missing shards.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import TTTPipeError

__all__ = [
    "PREDICTION_SCHEMA",
    "ACCURACY_SCHEMA",
    "PREDICTIONS_DIR",
    "ACCURACY_FILE",
    "RUN_FILE",
    "Results",
    "accuracy_table",
    "read_results",
    "shard_name",
    "predictions_uri",
]

log = logging.getLogger(__name__)

PREDICTIONS_DIR = "predictions"
ACCURACY_FILE = "accuracy.parquet"
RUN_FILE = "run.json"

PREDICTION_SCHEMA = pa.schema([
    ("sample_id", pa.int64()),
    ("shard", pa.string()),
    ("corruption", pa.string()),
    ("severity", pa.int8()),
    ("method", pa.string()),
    ("step", pa.int16()),
    ("label", pa.int16()),
    ("pred", pa.int16()),
    ("correct", pa.bool_()),
    ("confidence", pa.float32()),
    ("batch", pa.int32()),
    ("loss", pa.float32()),  # adaptation loss at that step; NaN for the last step
])

_GROUP_KEYS = ["method", "corruption", "severity", "step"]

ACCURACY_SCHEMA = pa.schema([
    ("method", pa.string()),
    ("corruption", pa.string()),
    ("severity", pa.int8()),
    ("step", pa.int16()),
    ("n", pa.int64()),
    ("correct", pa.int64()),
    ("accuracy", pa.float64()),
])


def shard_name(uri: str) -> str:
    """`.../gaussian_noise-s5-00000.parquet` -> `gaussian_noise-s5-00000`."""
    base = posixpath.basename(str(uri).rstrip("/"))
    return base[: -len(".parquet")] if base.endswith(".parquet") else base


def predictions_uri(results_uri: str, shard: str) -> str:
    """Where the predictions of one shard (a name or a shard URI) live in a results folder."""
    return storage.join(str(results_uri), PREDICTIONS_DIR, f"{shard_name(shard)}.parquet")


def accuracy_table(pred: pa.Table) -> pa.Table:
    """Aggregate predictions to one row per (method, corruption, severity, step), sorted.

    `n` counts predictions, `correct` the correct ones, `accuracy = correct / n`. Unlabelled
    data (null `label`/`correct`): `correct` and `accuracy` are null (predictions only); in a
    group mixing both, `accuracy` is over the labelled rows.
    """
    missing = [c for c in (*_GROUP_KEYS, "correct") if c not in pred.column_names]
    if missing:
        raise TTTPipeError(
            f"predictions lack column(s) {', '.join(missing)}; "
            "write them with pipeline.results.PREDICTION_SCHEMA")
    if pred.num_rows == 0:
        return ACCURACY_SCHEMA.empty_table()
    keys = pred.select(_GROUP_KEYS).cast(pa.schema([ACCURACY_SCHEMA.field(k) for k in _GROUP_KEYS]))
    hits = pc.cast(pred.column("correct"), pa.int64())
    grouped = keys.append_column("hit", hits).group_by(_GROUP_KEYS).aggregate(
        [([], "count_all"), ("hit", "count"), ("hit", "sum")])
    n = grouped.column("count_all").cast(pa.int64())
    labelled = grouped.column("hit_count").cast(pa.int64())
    correct = grouped.column("hit_sum").cast(pa.int64())  # null where no row is labelled
    acc = pc.divide(pc.cast(correct, pa.float64()), pc.cast(labelled, pa.float64()))
    table = pa.Table.from_arrays(
        [*(grouped.column(k) for k in _GROUP_KEYS), n, correct, acc], schema=ACCURACY_SCHEMA)
    return table.sort_by([(k, "ascending") for k in _GROUP_KEYS])


@dataclass(frozen=True)
class Results:
    """One results folder, read. `accuracy` is recomputed from the predictions on disk,
    so it is right for a partial folder too (`accuracy.parquet` is written only at the end)."""

    path: str
    predictions: pa.Table
    accuracy: pa.Table
    run: dict = field(default_factory=dict)
    done_shards: list[str] = field(default_factory=list)
    missing_shards: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The folder's own name, used to tell two runs of one method apart."""
        return posixpath.basename(self.path.rstrip("/")) or self.path

    @property
    def methods(self) -> list[str]:
        return sorted(set(self.accuracy.column("method").to_pylist()))

    @property
    def shard_uris(self) -> list[str]:
        """Every shard the run was asked to process (from run.json), as given there."""
        return [str(s) for s in self.run.get("shards", [])]

    @property
    def labelled(self) -> bool:
        """False when no prediction has a label (unlabelled data: accuracy left out)."""
        return self.accuracy.column("accuracy").null_count < self.accuracy.num_rows

    @property
    def complete(self) -> bool:
        return not self.missing_shards


def read_results(uri: str) -> Results:
    """Read a results folder (complete or partial). One-line TTTPipeError if it is not one."""
    uri = str(uri)
    if not storage.is_dir(uri):
        raise TTTPipeError(
            f"results folder {uri} not found; pass the --out folder of 'ttt-pipe adapt' or 'ttt-pipe run'")
    files = storage.list_files(storage.join(uri, PREDICTIONS_DIR), suffix=".parquet")
    if not files:
        raise TTTPipeError(
            f"no predictions in {uri} (no {PREDICTIONS_DIR}/*.parquet); "
            "wait until the run finishes a shard, or check the folder")
    predictions = pa.concat_tables([_read_predictions(f, uri) for f in files])
    run = _read_run(storage.join(uri, RUN_FILE), uri)
    done = [shard_name(f) for f in files]
    done_set = set(done)
    asked = [shard_name(s) for s in run.get("shards", [])]
    missing = sorted(dict.fromkeys(s for s in asked if s not in done_set))
    if missing:
        log.info("%s: %d of %d shards missing", uri, len(missing), len(asked))
    return Results(path=uri.rstrip("/") or uri, predictions=predictions,
                   accuracy=accuracy_table(predictions), run=run,
                   done_shards=done, missing_shards=missing)


def _read_predictions(uri: str, results_uri: str) -> pa.Table:
    fs, path = storage.resolve(uri)
    try:
        table = pq.read_table(path, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as exc:
        raise TTTPipeError(
            f"cannot read predictions {uri} ({' '.join(str(exc).split())}); delete that file and "
            "rerun the adaptation to redo its shard") from None
    missing = [f.name for f in PREDICTION_SCHEMA if f.name not in table.column_names]
    if missing:
        raise TTTPipeError(
            f"predictions {uri} lack column(s) {', '.join(missing)}; it was not written by "
            "ttt-pipe adapt (delete it and rerun)")
    try:
        return table.select(PREDICTION_SCHEMA.names).cast(PREDICTION_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise TTTPipeError(f"predictions {uri} have wrong column types ({exc}); delete it and rerun") from None


def _read_run(uri: str, results_uri: str) -> dict:
    if not storage.exists(uri):
        log.info("%s has no %s: cannot tell which shards are missing", results_uri, RUN_FILE)
        return {}
    try:
        run = json.loads(storage.read_bytes(uri).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TTTPipeError(f"{RUN_FILE} in {results_uri} is not valid JSON ({exc}); fix or delete it") from None
    if not isinstance(run, dict):
        raise TTTPipeError(f"{RUN_FILE} in {results_uri} is not a JSON object; fix or delete it")
    return run
