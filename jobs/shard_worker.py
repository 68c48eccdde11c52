"""Adapt one whole shard: read it, adapt batch by batch, write its predictions atomically.

This is the unit of work of `ttt-pipe adapt`. `ShardWorker` is a plain class (no Ray in it):
the pool in `jobs.pool` wraps it in `ray.remote`, and the benchmark runs it in-process.

Determinism: the predictions of a shard depend only on the checkpoint, the `AdaptSettings`
and the shard itself (plus torch's thread count on CPU, see `jobs.adapt`), never on which
worker ran it or what it ran before: batch boundaries are fixed by `batch_size` and never
straddle shards, the engine is `reset()` at every shard start (online mode starts fresh per
shard) and torch's RNG is seeded from (seed, shard name).

This is also `--stream iid`: every shard a stream of one. The other streams (continual,
mixed, correlated; `pipeline.streams`) are units too: `process` hands a `StreamUnit` to
`jobs.stream_worker.predict_stream`, one engine from the stream's start to its end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from pipeline import storage
from pipeline.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from pipeline.cost import cost_uri, max_rss_bytes
from pipeline.errors import TTTPipeError
from pipeline.results import PREDICTION_SCHEMA, SUMMARY_KEY, summarize_predictions, summarize_stream
from pipeline.shards import Shard, read_shard
from pipeline.streams import STREAM_KEY, StreamSettings, StreamUnit, parse_reset

__all__ = ["AdaptSettings", "PROTOCOLS", "ShardWorker", "build_adapt_engine", "predict_shard",
           "SETTINGS_KEY", "shard_seed"]

log = logging.getLogger(__name__)

SETTINGS_KEY = "ttt_pipe.adapt"  # Parquet key-value metadata of every predictions file
MODES = ("episodic", "online")
PROTOCOLS = ("batch", "per-sample")


@dataclass(frozen=True)
class AdaptSettings:
    """Everything that decides a shard's predictions (besides the shard itself)."""

    method: str
    weights_sha256: str
    steps: int
    lr: float
    batch_size: int
    mode: str = "episodic"
    seed: int = 0
    episodes: int = 1         # episodes adapted at once (engines/batched.py); episodic only
    protocol: str = "batch"   # "batch": a batch is an episode; "per-sample": each image is
    copies: int = 0           # one, adapted alone on `copies` augmented copies (0 for "batch")
    gate: str = "none"        # "entropy": step k's prediction only where it is less uncertain
                              # than step 0's (engines.entropy_gate)
    # The method's hyper-parameters beyond steps/lr/batch size (--method-config, canonical
    # JSON of the overrides; pipeline/methods.py resolves them against the method's config)
    # and EATA's Fisher source (--fisher-data "train" or shards, --fisher-samples; "" / 0: none).
    method_config: str = "{}"
    fisher_data: str = ""
    fisher_samples: int = 0
    fisher_dir: str = ""      # where "train" is searched (--data-dir): not compared on resume

    def flags(self) -> dict:
        """The adapt flags that win over the method's config (as the actors run them): what a
        record of the config that ran must show."""
        return {k: getattr(self, k) for k in ("steps", "lr", "batch_size", "mode", "gate")}

    def to_json(self) -> str:
        """What predictions files and accuracy.parquet store: every field but `fisher_dir`
        (where the data is mounted, not what it is: the bytes must not depend on it)."""
        fields = dataclasses.asdict(self)
        fields.pop("fisher_dir")
        return json.dumps(fields, sort_keys=True)


def shard_seed(seed: int, shard: str) -> int:
    """A torch seed per (run seed, shard name): independent of worker and order."""
    digest = hashlib.sha256(f"{seed}:{shard}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _copy_seeds(seed: int, sample_ids: np.ndarray) -> list[int]:
    """Per-sample protocol: the seed of each sample's augmented copies, from (seed, sample id)
    only (independent of shard, batch and worker)."""
    return [shard_seed(seed, f"copies:{int(i)}") for i in sample_ids]


def _adapt_batches(engine, shard: Shard, settings: AdaptSettings, device):
    """(batch index, start, stop, logits (K+1, B, C), losses (K, B)) for every batch in order.

    Batch boundaries are fixed by `batch_size` whatever `episodes` is. "batch": each batch is
    an episode (online mode carries the weights on); `episodes` G > 1 adapts G consecutive
    full batches at once (a shorter last batch alone). "per-sample": each image of a batch
    is an episode of its `copies` augmented copies, G images at a time.
    """
    n, size, g = len(shard.sample_ids), settings.batch_size, settings.episodes
    starts = list(range(0, n, size))
    kwargs = {"steps": settings.steps, "lr": settings.lr}
    if settings.protocol == "per-sample":
        from engines.batched import adapt_per_sample
        for b, start in enumerate(starts):
            stop = min(start + size, n)
            x = torch.from_numpy(np.array(shard.pixels(start, stop))).to(device)  # float32
            seeds = _copy_seeds(settings.seed, shard.sample_ids[start:stop])
            r = adapt_per_sample(engine, x, settings.copies, seeds, episodes=g, **kwargs)
            yield b, start, stop, r.logits, r.losses
        return
    b = 0
    while b < len(starts):
        group = [s for s in starts[b:b + g] if s + size <= n] or starts[b:b + 1]
        xs = torch.from_numpy(np.array(shard.pixels(group[0], min(group[-1] + size, n))))
        if len(group) == 1:
            r = engine.adapt(xs.to(device), mode=settings.mode, **kwargs)
            logits, losses = r.logits[:, None], r.losses[:, None]     # (K+1, 1, B, C), (K, 1)
        else:
            r = engine.adapt_episodes(xs.reshape(len(group), size, *xs.shape[1:]).to(device),
                                      **kwargs)
            logits, losses = r.logits, r.losses
        for j, start in enumerate(group):
            bsz = min(start + size, n) - start
            yield b + j, start, start + bsz, logits[:, j], losses[:, j, None].expand(-1, bsz)
        b += len(group)


def _to_host(logits: torch.Tensor, batch_losses: torch.Tensor, k: int):
    """(conf, pred, losses) of one batch as numpy (K+1, B) arrays; the loss of step K is NaN."""
    steps, bsz = logits.shape[0], logits.shape[1]
    with torch.no_grad():
        probs = torch.softmax(logits.detach().float(), dim=-1)          # (K+1, B, C)
        conf, pred = probs.max(dim=-1)                                   # (K+1, B) each
        # conf, pred (exact in float32 below 2**24 classes) and the K losses (K, B) in one
        # tensor: a single device-to-host copy per batch, the only CPU-GPU sync of the batch.
        packed = torch.cat([conf.reshape(-1), pred.reshape(-1).float(),
                            batch_losses.detach().float()[:k].reshape(-1)]).cpu().numpy()
    conf = packed[:steps * bsz].reshape(steps, bsz)
    pred = packed[steps * bsz:2 * steps * bsz].astype(np.int64).reshape(steps, bsz)
    losses = np.full((steps, bsz), np.nan, dtype=np.float32)            # step K: no loss
    losses[:k] = packed[2 * steps * bsz:].reshape(k, bsz)
    return conf, pred, losses


def predict_shard(engine, shard: Shard, settings: AdaptSettings, device: torch.device | str = "cpu",
                  after_batch: Callable[[int], None] | None = None, reset_every: int = 0) -> pa.Table:
    """Adapt `shard` batch by batch in order; one PREDICTION_SCHEMA row per (sample, step).

    Rows are ordered by batch, then step, then position in the shard. `reset_every` N > 0
    (`--reset every:N`, online mode): the engine is also reset after every N batches.
    """
    if hasattr(engine, "reset"):
        engine.reset()  # a fresh start per shard: results do not depend on the previous shard
    torch.manual_seed(shard_seed(settings.seed, shard.name))
    n, k = len(shard.sample_ids), settings.steps
    columns: dict[str, list[np.ndarray]] = {c: [] for c in
                                            ("sample_id", "step", "label", "pred", "conf", "batch", "loss")}
    for b, start, stop, logits, batch_losses in _adapt_batches(engine, shard, settings, device):
        conf, pred, losses = _to_host(logits, batch_losses, k)
        _append_batch(columns, shard.sample_ids[start:stop],
                      None if shard.labels is None else shard.labels[start:stop], conf, pred, losses, b)
        if after_batch is not None:
            after_batch(b)
        if reset_every and (b + 1) % reset_every == 0 and settings.mode == "online" and hasattr(engine, "reset"):
            engine.reset()  # --reset every:N; the generator adapts the next batch after this
    cat = {c: np.concatenate(v) if v else np.empty(0) for c, v in columns.items()}
    rows = len(cat["sample_id"])
    pred = cat["pred"].astype(np.int16)
    if shard.labels is None:  # unlabelled data: predictions only, label and correct null
        label, correct = pa.nulls(rows, pa.int16()), pa.nulls(rows, pa.bool_())
    else:
        label = pa.array(cat["label"].astype(np.int16))
        correct = pa.array(cat["label"].astype(np.int16) == pred)
    arrays = {
        **_step_arrays(cat, pred, settings.method),
        "shard": pa.array([shard.name] * rows, pa.string()),
        "corruption": pa.array([shard.corruption] * rows, pa.string()),
        "severity": pa.array(np.full(rows, shard.severity, dtype=np.int8)),
        "label": label,
        "correct": correct,
    }
    return pa.Table.from_arrays([arrays[f.name] for f in PREDICTION_SCHEMA], schema=PREDICTION_SCHEMA)


def _append_batch(columns: dict[str, list[np.ndarray]], sample_ids: np.ndarray, labels: np.ndarray | None,
                  conf: np.ndarray, pred: np.ndarray, losses: np.ndarray, batch: int) -> None:
    """One batch's rows onto `columns`: its (K+1, B) `_to_host` arrays flattened step-major,
    each sample's id (and label, when given) repeated once per step.

    The row layout of every predictions file, a shard's (`predict_shard`) and a stream's
    (`jobs.stream_worker.predict_stream`, which adds its own columns beside these).
    """
    steps, bsz = pred.shape
    columns["sample_id"].append(np.tile(sample_ids, steps))
    if labels is not None:
        columns["label"].append(np.tile(labels, steps))
    columns["step"].append(np.repeat(np.arange(steps), bsz))
    columns["pred"].append(pred.reshape(-1))
    columns["conf"].append(conf.reshape(-1))
    columns["batch"].append(np.full(steps * bsz, batch))
    columns["loss"].append(losses.reshape(-1))


def _step_arrays(cat: dict[str, np.ndarray], pred: np.ndarray, method: str) -> dict[str, pa.Array]:
    """The Arrow columns a shard's and a stream's predictions share, from the concatenated
    `_append_batch` columns (`pred` already int16: the caller compares it with the labels)."""
    rows = len(cat["sample_id"])
    return {
        "sample_id": pa.array(cat["sample_id"].astype(np.int64)),
        "method": pa.array([method] * rows, pa.string()),
        "step": pa.array(cat["step"].astype(np.int16)),
        "pred": pa.array(pred),
        "confidence": pa.array(cat["conf"].astype(np.float32)),
        "batch": pa.array(cat["batch"].astype(np.int32)),
        "loss": pa.array(cat["loss"].astype(np.float32)),
    }


def build_adapt_engine(checkpoint: Checkpoint, settings: AdaptSettings,
                       device: torch.device | str = "cpu", trusted=None):
    """`settings.method`'s engine for `checkpoint` (pipeline/methods.py: its own engine for a
    joint method, else the method around the checkpoint's model), its gate, in eval mode, and
    for EATA its Fisher information from `settings`' clean images."""
    from pipeline.methods import FisherSource, attach_fisher, build_method_engine, resolve_method

    choice = resolve_method(checkpoint, settings.method, json.loads(settings.method_config))
    engine = build_method_engine(checkpoint, choice.name, choice.config, device, trusted)
    if engine.config.gate != settings.gate:  # an adaptation setting, not a trained one
        engine.config = engine.config.replace(gate=settings.gate)
    engine.eval()  # test time, as the seeds' `engine.eval()`: no dropout, BN running stats
    attach_fisher(engine, FisherSource(settings.fisher_data, settings.fisher_samples,
                                       settings.fisher_dir or None),
                  checkpoint, settings.seed, settings.batch_size)
    return engine


def _ray_node_id() -> str | None:
    """The Ray node this worker runs on, for the summaries; None outside Ray (no Ray import)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


class ShardWorker:
    """Holds one engine (checkpoint loaded once); `process(shard_uri, out_uri)` does a shard.

    `device="auto"` asks Ray for this actor's GPU (`jobs.cluster.actor_device()`).
    `kill_marker` is a test hook: the first worker that creates that file dies mid-shard.
    `save_adapted`: a folder; each unit's final weights go to `<folder>/<unit name>/` as a
    checkpoint (online mode only: the driver refuses it for episodic runs).
    `process` also takes a `pipeline.streams.StreamUnit` (`jobs.stream_worker`).
    """

    def __init__(self, checkpoint: Checkpoint | str, settings: AdaptSettings, device: str = "cpu",
                 threads: int | None = None, kill_marker: str | None = None,
                 save_adapted: str | None = None, stream: StreamSettings | None = None):
        started = time.perf_counter()
        if threads:
            torch.set_num_threads(int(threads))
        if device == "auto":
            from jobs.cluster import actor_device
            device = actor_device()
        self.device = torch.device(device)
        if not isinstance(checkpoint, Checkpoint):
            checkpoint = load_checkpoint(checkpoint)
        if checkpoint.manifest["weights_sha256"] != settings.weights_sha256:
            raise TTTPipeError(f"checkpoint {checkpoint.uri} changed since the run started "
                               "(other weights sha256); rerun the command")
        self.engine = build_adapt_engine(checkpoint, settings, self.device)
        self.settings = settings
        self.kill_marker = kill_marker
        self.save_adapted = save_adapted
        self.stream = stream or StreamSettings()
        self.metadata = {SETTINGS_KEY: settings.to_json(), **self.stream.metadata()}
        self.checkpoint_uri, self.manifest = checkpoint.uri, checkpoint.manifest
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._ahead: tuple[str, Future] | None = None  # (shard uri, its read) started in advance
        self.init_seconds = time.perf_counter() - started
        self.pid = os.getpid()
        self.node = _ray_node_id()
        self.base_rss = max_rss_bytes()  # the process's peak once the checkpoint is loaded

    def _take(self, shard_uri: str) -> Shard:
        """The shard, from the prefetch started by the previous call if it was this one."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == shard_uri:
            return ahead[1].result()  # a read error surfaces here, as a direct read's would
        if ahead is not None:
            ahead[1].cancel()
        return read_shard(shard_uri)

    def _prefetch(self, unit: str | StreamUnit | None) -> None:
        shard_uri = unit.shards[0].uri if isinstance(unit, StreamUnit) else unit
        if shard_uri:
            self._ahead = (shard_uri, self._io.submit(read_shard, shard_uri))

    def info(self) -> dict:
        return {"pid": self.pid, "node": self.node, "device": str(self.device),
                "threads": torch.get_num_threads(), "init_seconds": self.init_seconds}

    def process(self, shard_uri: str | StreamUnit, out_uri: str,
                next_uri: str | StreamUnit | None = None) -> dict:
        """Adapt one shard and write `out_uri` atomically; return its summary and timings.

        `next_uri` (the shard this worker gets next) is read in a background thread while
        this one adapts, so the next call starts on data already in memory. The prefetch
        changes nothing in the results: the same bytes are read, only earlier.
        The file's footer carries the shard's summary (`pipeline.results.SUMMARY_KEY`).
        """
        if isinstance(shard_uri, StreamUnit):
            return self._process_stream(shard_uri, out_uri, next_uri)
        t0 = time.perf_counter()
        shard = self._take(shard_uri)
        self._prefetch(next_uri)
        base = self._start_cost()
        t1 = time.perf_counter()
        table = predict_shard(self.engine, shard, self.settings, self.device,
                              after_batch=self._maybe_die if self.kill_marker else None,
                              reset_every=parse_reset(self.stream.reset).every)
        adapt_s = time.perf_counter() - t1
        summary = summarize_predictions(table, shard.name, self.settings.steps + 1)
        t2 = time.perf_counter()
        self._write_cost(shard.name, len(shard.sample_ids), adapt_s, base, out_uri)
        self._save_adapted(shard.name, [shard_uri])
        storage.atomic_write_table(table, out_uri, metadata={
            **self.metadata, SUMMARY_KEY: json.dumps(summary, sort_keys=True)})
        t3 = time.perf_counter()
        return {**summary, "uri": shard_uri, "pid": self.pid, "node": self.node,
                "device": str(self.device),
                "read_s": t1 - t0, "adapt_s": t2 - t1, "write_s": t3 - t2}

    def _start_cost(self) -> int | None:
        """Start measuring a unit's peak memory; the baseline it is measured from."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        return self.base_rss

    def _write_cost(self, name: str, samples: int, adapt_s: float, base, out_uri: str) -> None:
        """The unit's cost beside its predictions, written first (pipeline.cost says why not in them)."""
        cuda = self.device.type == "cuda"
        storage.atomic_write_bytes(json.dumps({
            "shard": name, "method": self.settings.method, "samples": samples,
            "adapt_s": adapt_s, "actor": f"{self.node or 'local'}:{self.pid}",
            "device": str(self.device), "memory": "cuda_max_allocated" if cuda else "cpu_max_rss",
            "peak_bytes": torch.cuda.max_memory_allocated(self.device) if cuda else max_rss_bytes(),
            "base_bytes": base}, sort_keys=True).encode(), cost_uri(out_uri))

    def _process_stream(self, unit: StreamUnit, out_uri: str, next_unit) -> dict:
        """`process` for a stream: its shards are read as the stream reaches them."""
        from jobs.stream_worker import predict_stream

        t0 = time.perf_counter()
        read_s, first = [0.0], [True]

        def read(uri: str) -> Shard:  # the first read may be the prefetched one; then the next
            started = time.perf_counter()  # unit's first shard is read in the background
            try:
                if not first[0]:
                    return read_shard(uri)
                first[0] = False
                shard = self._take(uri)
                self._prefetch(next_unit)
                return shard
            finally:
                read_s[0] += time.perf_counter() - started

        base = self._start_cost()
        table = predict_stream(self.engine, unit, self.settings, self.stream, self.device, read,
                               after_batch=self._maybe_die if self.kill_marker else None)
        summary = summarize_stream(table, unit.name, self.settings.steps + 1)
        t2 = time.perf_counter()
        self._write_cost(unit.name, int(summary["samples"]), t2 - t0 - read_s[0], base, out_uri)
        self._save_adapted(unit.name, [s.uri for s in unit.shards])
        storage.atomic_write_table(table, out_uri, metadata={
            **self.metadata, SUMMARY_KEY: json.dumps(summary, sort_keys=True)})
        t3 = time.perf_counter()
        return {**summary, "uri": unit.name, "pid": self.pid, "node": self.node,
                "device": str(self.device),
                "read_s": read_s[0], "adapt_s": t2 - t0 - read_s[0], "write_s": t3 - t2}

    def _save_adapted(self, name: str, shard_uris: list[str]) -> None:
        """The weights the unit ended with as a checkpoint `<save_adapted>/<name>/` (manifest +
        sha256), before the predictions file: a unit whose predictions exist has its checkpoint."""
        if not self.save_adapted:
            return
        training = dict(self.manifest.get("training", {}))
        training["adapted"] = {"from": self.checkpoint_uri,
                               "from_weights_sha256": self.manifest["weights_sha256"],
                               "unit": name, "shards": shard_uris,
                               "settings": dataclasses.asdict(self.settings),
                               "stream": dataclasses.asdict(self.stream)}
        manifest = {k: v for k, v in self.manifest.items()
                    if k not in ("format_version", "weights_sha256", "created")}
        # the method that ran (maybe not the checkpoint's: adapt --method), so the saved weights
        # (this engine's state_dict) load back as that method's checkpoint
        manifest["method"] = {"name": self.settings.method,
                              "config": self.engine.config.replace(**self.settings.flags()).to_dict()}
        save_checkpoint(storage.join(self.save_adapted, name), self.engine.state_dict(),
                        {**manifest, "training": training})

    def _maybe_die(self, batch: int) -> None:
        try:  # O_EXCL: of all workers, exactly one creates the marker and dies
            fd = os.open(self.kill_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, f"{self.pid} died after batch {batch}\n".encode())
        os.close(fd)
        log.warning("test hook: worker %d exits mid-shard", self.pid)
        os._exit(1)
