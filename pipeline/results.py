"""The results folder: prediction and accuracy schemas, the accuracy aggregation, reading.

A results folder (local path or `s3://...` URI) holds

    predictions/<shard>.parquet   one row per (sample, step), PREDICTION_SCHEMA (`--stream iid`)
    predictions/<stream>.parquet  one row per (shard, sample, step), STREAM_PREDICTION_SCHEMA
                                  (other streams, `pipeline.streams`: PREDICTION_SCHEMA + `stream`,
                                  `position`)
    accuracy.parquet              one row per (method, corruption, severity, step), ACCURACY_SCHEMA;
                                  stream runs: STREAM_ACCURACY_SCHEMA, one row per (method, stream,
                                  corruption, severity, step)
    run.json                      the resolved run config; `shards` lists every shard URI asked for,
                                  `streams` (stream runs) the shard names of every stream

A shard is done when the predictions file of its stream exists (written atomically), so a
folder of a run still going, or interrupted, is readable: `read_results` names the missing shards.
An iid file has exactly the pre-stream schema and bytes; `read_results` of a folder that holds
stream files gives every row a `stream` (an iid file's rows: the shard's name) and `position`
(null for iid rows: their order is `batch`, then the shard's stored order).

Every predictions file carries its shard's summary (`SUMMARY_KEY` in the Parquet footer's
key-value metadata, written in the same atomic write as the rows, so it can never be stale or
missing): rows, samples, and per (method, corruption, severity, step) `n` and `correct`.
`accuracy_from_summaries` aggregates them into exactly `accuracy_table`'s result, so the
driver reads footers only, never the predictions themselves.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field

import numpy as np
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
    "SUMMARY_KEY",
    "summarize_predictions",
    "accuracy_from_summaries",
    "STREAM_PREDICTION_SCHEMA",
    "STREAM_ACCURACY_SCHEMA",
    "summarize_stream",
]

log = logging.getLogger(__name__)

PREDICTIONS_DIR = "predictions"
ACCURACY_FILE = "accuracy.parquet"
RUN_FILE = "run.json"
SUMMARY_KEY = "ttt_pipe.summary"  # Parquet key-value metadata of every predictions file

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

# Stream files (`--stream continual|mixed|correlated`): the stream's name, and the row's
# position in the stream (0 = the first sample the engine saw). An iid file has neither, so its
# bytes stay what they were before streams existed.
STREAM_PREDICTION_SCHEMA = pa.schema([*PREDICTION_SCHEMA, ("stream", pa.string()),
                                      ("position", pa.int64())])

_GROUP_KEYS = ["method", "corruption", "severity", "step"]
_STREAM_KEYS = ["method", "stream", "corruption", "severity", "step"]

ACCURACY_SCHEMA = pa.schema([
    ("method", pa.string()),
    ("corruption", pa.string()),
    ("severity", pa.int8()),
    ("step", pa.int16()),
    ("n", pa.int64()),
    ("correct", pa.int64()),
    ("accuracy", pa.float64()),
])

# accuracy.parquet of a stream run: the same rows split by stream (sum over `stream` for the
# per-(corruption, severity) numbers; a corruption appears in one continual/mixed stream per
# severity, in one correlated stream per shard).
STREAM_ACCURACY_SCHEMA = pa.schema([ACCURACY_SCHEMA.field("method"), ("stream", pa.string()),
                                    *(f for f in ACCURACY_SCHEMA if f.name != "method")])


def shard_name(uri: str) -> str:
    """`.../gaussian_noise-s5-00000.parquet` -> `gaussian_noise-s5-00000`."""
    base = posixpath.basename(str(uri).rstrip("/"))
    return base[: -len(".parquet")] if base.endswith(".parquet") else base


def predictions_uri(results_uri: str, shard: str) -> str:
    """Where the predictions of one shard (a name or a shard URI) live in a results folder."""
    return storage.join(str(results_uri), PREDICTIONS_DIR, f"{shard_name(shard)}.parquet")


def accuracy_table(pred: pa.Table, by_stream: bool = False) -> pa.Table:
    """Aggregate predictions to one row per (method, corruption, severity, step), sorted;
    `by_stream` (predictions with a `stream` column): STREAM_ACCURACY_SCHEMA, one row per
    (method, stream, corruption, severity, step).

    `n` counts predictions, `correct` the correct ones, `accuracy = correct / n`. Unlabelled
    data (null `label`/`correct`): `correct` and `accuracy` are null (predictions only); in a
    group mixing both, `accuracy` is over the labelled rows.
    """
    missing = [c for c in (*_GROUP_KEYS, "correct") if c not in pred.column_names]
    if missing:
        raise TTTPipeError(
            f"predictions lack column(s) {', '.join(missing)}; "
            "write them with pipeline.results.PREDICTION_SCHEMA")
    keys = _STREAM_KEYS if by_stream and "stream" in pred.column_names else _GROUP_KEYS
    if pred.num_rows == 0:
        return _accuracy_schema(keys).empty_table()
    grouped = _grouped(pred, keys)
    return _accuracy([grouped.column(k) for k in keys], grouped.column("n"),
                     grouped.column("labelled"), grouped.column("correct"), keys)


def _accuracy_schema(keys: list[str]) -> pa.Schema:
    return STREAM_ACCURACY_SCHEMA if "stream" in keys else ACCURACY_SCHEMA


def _grouped(pred: pa.Table, keys: list[str] = _GROUP_KEYS) -> pa.Table:
    """Per `keys` (default (method, corruption, severity, step); `_STREAM_KEYS` adds `stream`),
    sorted: n, labelled (rows with a label), correct (null where no row is labelled)."""
    schema = _accuracy_schema(keys)
    key_table = pred.select(keys).cast(pa.schema([schema.field(k) for k in keys]))
    hits = pc.cast(pred.column("correct"), pa.int64())
    grouped = key_table.append_column("hit", hits).group_by(keys).aggregate(
        [([], "count_all"), ("hit", "count"), ("hit", "sum")])
    return pa.Table.from_arrays(
        [*(grouped.column(k) for k in keys), grouped.column("count_all").cast(pa.int64()),
         grouped.column("hit_count").cast(pa.int64()), grouped.column("hit_sum").cast(pa.int64())],
        names=[*keys, "n", "labelled", "correct"]).sort_by([(k, "ascending") for k in keys])


def _accuracy(key_columns, n, labelled, correct, keys: list[str] = _GROUP_KEYS) -> pa.Table:
    acc = pc.divide(pc.cast(correct, pa.float64()), pc.cast(labelled, pa.float64()))
    table = pa.Table.from_arrays([*key_columns, n, correct, acc], schema=_accuracy_schema(keys))
    return table.sort_by([(k, "ascending") for k in keys])


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
    units: list[str] = field(default_factory=list)  # predictions files' names (shards, streams)

    @property
    def done_units(self) -> list[str]:
        """The units of work done, one per predictions file: an iid shard or a whole stream
        (which covers several of `done_shards`). A hand-built Results: its done shards."""
        return self.units or self.done_shards

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
    tables = [_read_predictions(f, uri) for f in files]
    if any("stream" in t.column_names for t in tables):
        tables = [t if "stream" in t.column_names else _with_stream_columns(t) for t in tables]
    predictions = pa.concat_tables(tables)
    run = _read_run(storage.join(uri, RUN_FILE), uri)
    streams = run.get("streams") or {}
    done = [name for f in files for name in streams.get(shard_name(f), [shard_name(f)])]
    done_set = set(done)
    asked = [shard_name(s) for s in run.get("shards", [])]
    missing = sorted(dict.fromkeys(s for s in asked if s not in done_set))
    if missing:
        log.info("%s: %d of %d shards missing", uri, len(missing), len(asked))
    return Results(path=uri.rstrip("/") or uri, predictions=predictions,
                   accuracy=accuracy_table(predictions, by_stream=True), run=run,
                   done_shards=done, missing_shards=missing, units=[shard_name(f) for f in files])


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
    schema = STREAM_PREDICTION_SCHEMA if "stream" in table.column_names else PREDICTION_SCHEMA
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise TTTPipeError(f"predictions {uri} have wrong column types ({exc}); delete it and rerun") from None


def _with_stream_columns(table: pa.Table) -> pa.Table:
    """An iid file's rows in a folder with stream files: stream = the shard, no position."""
    return table.append_column("stream", table.column("shard")).append_column(
        "position", pa.nulls(table.num_rows, pa.int64()))


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


def summarize_predictions(pred: pa.Table, shard: str, steps: int) -> dict:
    """A shard's summary (JSON-able), after checking exactly one row per (sample, step).

    `steps` counts the prediction steps (adaptation steps + 1). A violation is a one-line
    TTTPipeError naming the shard. `groups`: per (method, corruption, severity, step)
    [..keys, n, labelled, correct] (`correct` null when the shard has no labels).
    """
    ids = pred.column("sample_id").to_numpy()
    step = pred.column("step").to_numpy().astype(np.int64)
    samples = int(np.unique(ids).size)
    pairs = int(np.unique(ids * steps + step).size) if len(ids) else 0
    if pred.num_rows != samples * steps or pairs != pred.num_rows or \
            (len(step) and (step.min() < 0 or step.max() >= steps)):
        raise TTTPipeError(
            f"predictions of shard {shard} have {pred.num_rows} rows ({pairs} distinct sample-step "
            f"pairs, {samples} samples), expected one per sample and step 0..{steps - 1}")
    groups = [[r[k] for k in _GROUP_KEYS] + [r["n"], r["labelled"], r["correct"]]
              for r in _grouped(pred).to_pylist()] if pred.num_rows else []
    return {"shard": shard, "rows": pred.num_rows, "samples": samples, "steps": steps,
            "groups": groups}


def summarize_stream(pred: pa.Table, stream: str, steps: int) -> dict:
    """A stream's summary (JSON-able), after checking exactly one row per (shard, sample, step).

    A stream holds several shards, and the same sample id under several corruptions, so the
    check runs per shard (`summarize_predictions`). `shards`: {shard name: samples}; `groups`
    as there, summed over the stream's shards.
    """
    names = pred.column("shard")
    shards: dict[str, int] = {}
    groups: list[list] = []
    for name in sorted(names.unique().to_pylist()):
        part = summarize_predictions(pred.filter(pc.equal(names, name)), name, steps)
        shards[name] = part["samples"]
        groups.extend(part["groups"])
    return {"stream": stream, "rows": pred.num_rows, "samples": sum(shards.values()),
            "steps": steps, "shards": shards, "groups": groups}


def accuracy_from_summaries(summaries, by_stream: bool = False) -> pa.Table:
    """`accuracy_table` of all predictions, computed from their shards' summaries alone.

    `by_stream`: STREAM_ACCURACY_SCHEMA, the same counts split by each summary's `stream`.
    """
    if by_stream:
        return _accuracy_by_stream(summaries)
    totals: dict[tuple, list] = {}
    for summary in summaries:
        for *key, n, labelled, correct in summary["groups"]:
            acc = totals.setdefault(tuple(key), [0, 0, None])
            acc[0] += int(n)
            acc[1] += int(labelled)
            if correct is not None:
                acc[2] = (acc[2] or 0) + int(correct)
    if not totals:
        return ACCURACY_SCHEMA.empty_table()
    keys = sorted(totals)
    columns = [pa.array([k[i] for k in keys], ACCURACY_SCHEMA.field(name).type)
               for i, name in enumerate(_GROUP_KEYS)]
    return _accuracy(columns, *(pa.array([totals[k][i] for k in keys], pa.int64())
                                for i in range(3)))


def _accuracy_by_stream(summaries) -> pa.Table:
    parts = []
    for summary in sorted(summaries, key=lambda x: x.get("stream", x.get("shard"))):
        table = accuracy_from_summaries([summary])
        stream = pa.array([summary.get("stream", summary.get("shard"))] * table.num_rows, pa.string())
        parts.append(table.add_column(1, STREAM_ACCURACY_SCHEMA.field("stream"), stream))
    if not parts:
        return STREAM_ACCURACY_SCHEMA.empty_table()
    return pa.concat_tables(parts).sort_by([(k, "ascending") for k in _STREAM_KEYS])
