"""What adaptation costs: time per sample and peak memory per actor, per shard.

Why a sidecar file and not the predictions footer: a predictions file must be byte-identical
whatever actor wrote it, and on a retry (DESIGN.md invariant 1; tests compare the bytes).
Seconds and bytes of memory differ from run to run, so they cannot live in that file. Each
actor writes `predictions/<shard>.cost.json` (atomically, just BEFORE the shard's predictions,
so every shard a newer ttt-pipe finished has one; a shard retried rewrites it), and
`finalize_results` gathers them into `cost.parquet` (COST_SCHEMA, one row per shard).
Results folders of older versions have neither: their cost reads as absent ("n/a").

Memory, by device (`memory` column says which was measured):
- `cuda_max_allocated`: `torch.cuda.max_memory_allocated` over this shard (peak stats reset at
  the shard's start); `base_bytes` = `torch.cuda.memory_allocated` at the start (the weights).
- `cpu_max_rss`: `resource.getrusage(RUSAGE_SELF).ru_maxrss` (the actor process's peak
  resident set so far, torch and the model included) after the shard; `base_bytes` = the same
  at the end of the actor's start-up (checkpoint loaded), so `peak - base` is what
  adaptation added to the process's peak. ru_maxrss is KiB on Linux, bytes on macOS.
"""

from __future__ import annotations

import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import TTTPipeError

__all__ = ["COST_FILE", "COST_SUFFIX", "COST_SCHEMA", "MEMORY_KINDS", "cost_uri", "read_costs",
           "costs_table", "max_rss_bytes"]

log = logging.getLogger(__name__)

COST_FILE = "cost.parquet"      # in the results folder, next to accuracy.parquet
COST_SUFFIX = ".cost.json"      # predictions/<shard>.cost.json, next to <shard>.parquet
MEMORY_KINDS = ("cuda_max_allocated", "cpu_max_rss")

COST_SCHEMA = pa.schema([
    ("shard", pa.string()),
    ("method", pa.string()),
    ("samples", pa.int64()),
    ("adapt_s", pa.float64()),     # seconds in the engine for this shard (read/write excluded)
    ("actor", pa.string()),        # "<node>:<pid>": one actor process
    ("device", pa.string()),
    ("memory", pa.string()),       # one of MEMORY_KINDS
    ("peak_bytes", pa.int64()),
    ("base_bytes", pa.int64()),
])


def cost_uri(predictions_file: str) -> str:
    """`.../predictions/<shard>.parquet` -> `.../predictions/<shard>.cost.json`."""
    uri = str(predictions_file)
    stem = uri[: -len(".parquet")] if uri.endswith(".parquet") else uri
    return stem + COST_SUFFIX


def max_rss_bytes() -> int | None:
    """This process's peak resident set size in bytes (None where getrusage is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def costs_table(records: list[dict]) -> pa.Table:
    """Cost records (the sidecars' JSON) -> COST_SCHEMA rows, sorted by shard."""
    records = sorted(records, key=lambda r: r["shard"])
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in COST_SCHEMA} for r in records],
                                schema=COST_SCHEMA)


def _read_sidecar(uri: str) -> dict | None:
    if not storage.exists(uri):
        return None
    try:
        record = json.loads(storage.read_bytes(uri).decode("utf-8"))
    except (TTTPipeError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TTTPipeError(f"cannot read cost file {uri} ({' '.join(str(exc).split())}); "
                           "delete it (its shard then shows cost n/a)") from None
    if not isinstance(record, dict) or not isinstance(record.get("shard"), str):
        raise TTTPipeError(f"cost file {uri} is not a ttt-pipe cost record; delete it")
    return record


def read_costs(results_uri: str, predictions_files: list[str], threads: int = 8) -> pa.Table:
    """The cost rows of a results folder: `cost.parquet` when a finished run wrote it, else
    the sidecars of `predictions_files` (a partial run). Empty when none exist (older folders)."""
    whole = storage.join(str(results_uri), COST_FILE)
    if storage.exists(whole):
        fs, path = storage.resolve(whole)
        try:
            return pq.read_table(path, filesystem=fs).select(COST_SCHEMA.names).cast(COST_SCHEMA)
        except (pa.ArrowException, OSError, KeyError) as exc:
            raise TTTPipeError(f"cannot read {whole} ({' '.join(str(exc).split())}); delete it "
                               "(rerun the adapt command to rewrite it)") from None
    with ThreadPoolExecutor(max_workers=threads) as pool:  # small reads: in parallel on stores
        found = list(pool.map(_read_sidecar, [cost_uri(f) for f in predictions_files]))
    records = [r for r in found if r is not None]
    return costs_table(records)
