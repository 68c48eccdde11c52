"""Adapt one evaluation stream (continual, mixed, correlated) from start to end in one engine.

`ShardWorker.process` hands a `pipeline.streams.StreamUnit` here; an iid unit (a shard)
never comes here: it keeps `jobs.shard_worker.predict_shard`, byte for byte.

The stream's row order comes from `pipeline.streams.stream_segments` (a pure function of the
seed, the stream and the shards' row counts and labels). Rows are gathered from their shards
in WINDOWS of whole batches and adapted window by window, so memory is bounded: one window of
images (at most `_WINDOW_BYTES` of float32 pixels, at least one batch) plus the one decoded
shard the reader keeps (`_ShardCache`). A continual stream reads each shard once; a mixed
stream, whose windows draw from every shard of its severity, reads each shard once per window
(one window, i.e. one read each, while the severity's pixels fit in `_WINDOW_BYTES`). Windows
change only when rows are read, never the predictions: batch boundaries are fixed by
`batch_size` from each segment's start (batches never straddle a segment).

Resets (online mode): the engine is reset and torch seeded at the stream start, from the
first shard's name for a continual stream (so its first domain equals that shard's iid run)
and from the stream's name otherwise; `--reset domain` resets and seeds the same way at every
domain start; `--reset every:N` resets after every N batches of the stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import storage
from pipeline.results import STREAM_PREDICTION_SCHEMA
from pipeline.shards import Shard, to_pixels
from pipeline.streams import Segment, StreamSettings, StreamUnit, parse_reset, stream_segments

__all__ = ["predict_stream", "read_labels"]

log = logging.getLogger(__name__)

_WINDOW_BYTES = 1 << 30  # float32 pixels of one window of rows (1 GiB)


def read_labels(uri: str) -> np.ndarray:
    """A shard's label column alone (no pixels): what a Dirichlet order needs."""
    fs, path = storage.resolve(uri)
    labels = pq.read_table(path, columns=["label"], filesystem=fs).column("label")
    return labels.to_numpy(zero_copy_only=False).astype(np.int64)


class _ShardCache:
    """The last decoded shard (a continual stream reads each once; `read` is the worker's)."""

    def __init__(self, unit: StreamUnit, read: Callable[[str], Shard]):
        self.unit, self.read, self.index, self.shard = unit, read, None, None

    def get(self, index: int) -> Shard:
        if index != self.index:
            self.shard = None  # drop the old one before reading the next: one at a time
            self.shard, self.index = self.read(self.unit.shards[index].uri), index
        return self.shard


def _gather(unit: StreamUnit, cache: _ShardCache, seg: Segment, start: int, stop: int):
    """Rows start:stop of a segment: (window Shard, shard index per row)."""
    si, ri = seg.shard_index[start:stop], seg.row[start:stop]
    n = stop - start
    parts, ids = [], np.empty(n, np.int64)
    labels = np.full(n, -1, np.int64)
    present, first_use = np.unique(si, return_index=True)
    for k in present[np.argsort(first_use)].tolist():  # in order of first use
        shard = cache.get(k)
        mask = si == k
        ids[mask] = shard.sample_ids[ri[mask]]
        if shard.labels is not None:
            labels[mask] = shard.labels[ri[mask]]
        parts.append((mask, shard.images[ri[mask]]))
    dtypes = {p.dtype for _, p in parts}
    dtype = dtypes.pop() if len(dtypes) == 1 else np.float32  # mixed storage: pixel units
    images = np.empty((n, *parts[0][1].shape[1:]), dtype)
    for mask, part in parts:
        images[mask] = part if part.dtype == dtype else to_pixels(part)
    window = Shard(name=unit.name, corruption="", severity=0, sample_ids=ids,
                   labels=labels, images=images)
    return window, si


def predict_stream(engine, unit: StreamUnit, settings, stream: StreamSettings, device,
                   read: Callable[[str], Shard],
                   after_batch: Callable[[int], None] | None = None) -> pa.Table:
    """Adapt `unit` in stream order; one STREAM_PREDICTION_SCHEMA row per (shard, sample, step).

    Rows are ordered by batch, then step, then position in the stream.
    """
    from jobs.shard_worker import (_adapt_batches, _append_batch, _step_arrays,  # the iid path's own
                                   _to_host, shard_seed)

    reset = parse_reset(stream.reset)
    online = settings.mode == "online"
    def labels_of(i: int) -> np.ndarray:
        return read_labels(unit.shards[i].uri)

    segments = stream_segments(unit, settings.seed, labels_of if unit.dirichlet is not None else None)
    cache = _ShardCache(unit, read)
    first = cache.get(int(segments[0].shard_index[0])) if segments and len(segments[0]) else None
    row_bytes = 4 * int(np.prod(first.images.shape[1:])) if first is not None else 4
    size = settings.batch_size * settings.episodes  # whole groups of episodes per window
    window_rows = max(1, _WINDOW_BYTES // (row_bytes * size)) * size
    k, steps = settings.steps, settings.steps + 1
    names = [s.name for s in unit.shards]
    cols: dict[str, list[np.ndarray]] = {c: [] for c in ("sample_id", "shard", "step", "label", "pred",
                                                         "conf", "batch", "loss", "position")}
    b_global, position = 0, 0
    for j, seg in enumerate(segments):
        if j == 0 or (reset.kind == "domain" and seg.domain_start):
            if hasattr(engine, "reset"):
                engine.reset()
            key = unit.shards[int(seg.shard_index[0])].name if unit.kind == "continual" else unit.name
            torch.manual_seed(shard_seed(settings.seed, key))
        for w0 in range(0, len(seg), window_rows):
            window, si = _gather(unit, cache, seg, w0, min(w0 + window_rows, len(seg)))
            for b, start, stop, logits, losses in _adapt_batches(engine, window, settings, device):
                bsz = stop - start
                conf, pred, loss = _to_host(logits, losses, k)
                _append_batch(cols, window.sample_ids[start:stop], window.labels[start:stop],
                              conf, pred, loss, b_global)
                cols["shard"].append(np.tile(si[start:stop], steps))
                cols["position"].append(np.tile(np.arange(position, position + bsz), steps))
                if after_batch is not None:
                    after_batch(b_global)
                b_global += 1
                position += bsz
                # the generator adapts the next batch only when asked: a reset here comes first
                if online and reset.kind == "every" and b_global % reset.every == 0 and hasattr(engine, "reset"):
                    engine.reset()
    cat = {c: np.concatenate(v) if v else np.empty(0, np.int64) for c, v in cols.items()}
    rows = len(cat["sample_id"])
    shard_idx = cat["shard"].astype(np.int32)
    corruption = np.array([s.corruption for s in unit.shards], dtype=object)
    severity = np.array([s.severity for s in unit.shards], dtype=np.int8)
    pred = cat["pred"].astype(np.int16)
    label = cat["label"]
    has = label >= 0  # a shard without labels: label and correct null (predictions only)
    label_arr = pa.array(label.astype(np.int16), mask=~has)
    correct_arr = pa.array(label.astype(np.int16) == pred, mask=~has)
    arrays = {
        **_step_arrays(cat, pred, settings.method),
        "shard": pa.DictionaryArray.from_arrays(pa.array(shard_idx), pa.array(names, pa.string()))
        .cast(pa.string()),
        "corruption": pa.array(corruption[shard_idx].tolist() if rows else [], pa.string()),
        "severity": pa.array(severity[shard_idx] if rows else np.empty(0, np.int8)),
        "label": label_arr,
        "correct": correct_arr,
        "stream": pa.array([unit.name] * rows, pa.string()),
        "position": pa.array(cat["position"].astype(np.int64)),
    }
    return pa.Table.from_arrays([arrays[f.name] for f in STREAM_PREDICTION_SCHEMA],
                                schema=STREAM_PREDICTION_SCHEMA)
