"""Make a set of shards: test split -> corruptions x severities -> Parquet files.

Two steps, so that a Ray job (:mod:`jobs.corrupt`) and the in-process :func:`make_shards`
run the same code:

- :func:`plan_make` validates every argument, finds the data and counts its test samples,
  picks the corruption suite from the data's shape (:func:`pipeline.corruptions.suites.suite_for`:
  ``mnist-c`` for grayscale, ``imagenet-c`` for RGB) and lists one :class:`ShardTask` per file
  ``<corruption>-s<severity>-<index:05d>.parquet`` (``identity`` once, at severity 0). It
  writes nothing but the (empty) output folder.
- :func:`write_task` makes one file: it reads only its chunk of the split (the datasets
  iterator), corrupts it and writes it atomically. Memory is bounded by one chunk.

Storage: ``identity`` (the clean images) and the ``imagenet-c`` suite are stored as uint8;
the ``mnist-c`` suite as float32 pixel units (its noise is unclipped and must survive exactly).
The suite is recorded in every shard's metadata. The same arguments give byte-identical files
whatever the order or parallelism: a file depends only on its task (corruptions are seeded
per sample, the Parquet writer options are pinned). On any failure (or Ctrl-C) the files the
run wrote are removed (:func:`remove_written`), so a folder never holds a partial set.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from pipeline import storage
from pipeline.corruptions import parse_severities
from pipeline.corruptions.suites import corrupt_batch, parse_corruptions, suite_for
from pipeline.datasets import DatasetSpec, get_dataset, iter_split, split_length
from pipeline.errors import TTTPipeError
from pipeline.shards import SUFFIX, shard_name, write_shard

__all__ = ["ShardSummary", "ShardTask", "MakePlan", "make_shards", "plan_make", "plan_shards",
           "write_in_process",
           "write_task", "remove_written", "DEFAULT_SHARD_SIZE", "IDENTITY"]

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 2000
IDENTITY = "identity"

Progress = Callable[[int, int, str], None]  # (shards done, shards total, uri just written)


@dataclass(frozen=True)
class ShardSummary:
    """What :func:`make_shards` (or ``jobs.corrupt``) wrote."""

    out: str
    dataset: str
    shards: list[str] = field(default_factory=list)  # uris, in plan order
    pairs: list[tuple[str, int]] = field(default_factory=list)  # (corruption, severity)
    samples: int = 0  # test samples per (corruption, severity)
    rows: int = 0  # rows over all shards
    suite: str = ""

    @property
    def bytes(self) -> int:
        total = 0
        for uri in self.shards:
            fs, path = storage.resolve(uri)
            total += fs.get_file_info(path).size or 0
        return total


@dataclass(frozen=True)
class ShardTask:
    """One shard file: rows ``lo:hi`` of the test split under one (corruption, severity)."""

    uri: str
    corruption: str
    severity: int
    lo: int
    hi: int

    @property
    def name(self) -> str:
        return storage.basename(self.uri).removesuffix(SUFFIX)


@dataclass(frozen=True)
class MakePlan:
    """Everything :func:`write_task` needs, validated; picklable (sent to Ray tasks)."""

    spec: DatasetSpec
    out: str
    suite: str
    pairs: list[tuple[str, int]]
    samples: int
    seed: int
    tasks: list[ShardTask]
    data_dir: str | None = None
    download: bool | None = None
    created_out: bool = False  # this run created `out` (removed again on failure)

    def summary(self) -> ShardSummary:
        return ShardSummary(out=str(self.out), dataset=self.spec.name,
                            shards=[t.uri for t in self.tasks], pairs=list(self.pairs),
                            samples=self.samples, rows=self.samples * len(self.pairs),
                            suite=self.suite)


def plan_shards(corruptions: str | Iterable[str], severities: str | Iterable[int],
                identity: bool = True, suite: str = "mnist-c") -> list[tuple[str, int]]:
    """The (corruption, severity) pairs to write, in order: identity (severity 0) first."""
    names = parse_corruptions(corruptions, suite)
    levels = sorted(parse_severities(severities))
    pairs = [(IDENTITY, 0)] if identity or IDENTITY in names else []
    pairs += [(name, sev) for name in names if name != IDENTITY for sev in levels]
    return pairs


def plan_make(dataset: str | DatasetSpec, out: str, corruptions: str | Iterable[str] = "all",
              severities: str | Iterable[int] = (1, 2, 3, 4, 5), *,
              data_dir: str | os.PathLike | None = None, identity: bool = True,
              shard_size: int = DEFAULT_SHARD_SIZE, limit: int | None = None, seed: int = 0,
              download: bool | None = None, image_size: int | None = None) -> MakePlan:
    """Validate everything and list the files to write; creates ``out`` (empty) only."""
    _check_positive("shard_size", shard_size)
    if limit is not None:
        _check_positive("limit", limit)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise TTTPipeError(f"seed must be a non-negative integer, got {seed!r}")
    spec = get_dataset(dataset, image_size)
    suite = suite_for(spec.image_shape)
    pairs = plan_shards(corruptions, severities, identity, suite)
    data_dir = None if data_dir is None else str(data_dir)
    total = _split_length(spec, data_dir, download)
    n = total if limit is None else min(limit, total)
    if n == 0:
        raise TTTPipeError(f"the {spec.name} test split is empty; pass the full files with --data-dir")
    chunks = [(lo, min(lo + shard_size, n)) for lo in range(0, n, shard_size)]
    tasks = [ShardTask(storage.join(out, shard_name(c, s, i) + SUFFIX), c, s, lo, hi)
             for c, s in pairs for i, (lo, hi) in enumerate(chunks)]
    created = _prepare_out(out, {storage.basename(t.uri) for t in tasks})
    return MakePlan(spec=spec, out=str(out), suite=suite, pairs=pairs, samples=n, seed=int(seed),
                    tasks=tasks, data_dir=data_dir, download=download, created_out=created)


def write_task(plan: MakePlan, task: ShardTask) -> dict:
    """Make one shard file (reads only rows ``task.lo:task.hi``); returns its uri and rows."""
    ids, labels, images = _read_rows(plan, task.lo, task.hi)
    if task.corruption == IDENTITY:
        x = images  # clean 8-bit data: stored as uint8 in both suites
    else:
        x = corrupt_batch(images, task.corruption, task.severity, ids, plan.seed,
                          suite=plan.suite, std=plan.spec.std)
    write_shard(task.uri, ids, labels, x, corruption=task.corruption, severity=task.severity,
                dataset=plan.spec.name, mean=plan.spec.mean, std=plan.spec.std, seed=plan.seed,
                suite=plan.suite)
    return {"uri": task.uri, "rows": len(ids)}


def make_shards(dataset: str | DatasetSpec, out: str, corruptions: str | Iterable[str] = "all",
                severities: str | Iterable[int] = (1, 2, 3, 4, 5), *,
                data_dir: str | os.PathLike | None = None, identity: bool = True,
                shard_size: int = DEFAULT_SHARD_SIZE, limit: int | None = None, seed: int = 0,
                download: bool | None = None, image_size: int | None = None,
                progress: Progress | None = None) -> ShardSummary:
    """Corrupt ``dataset``'s test split and write the shards under ``out``, in this process.

    ``corruptions``: ``"a,b"``, ``"all"`` (and for RGB data ``"common"``/``"validation"``);
    ``identity=True`` also writes the clean baseline once. ``limit`` keeps the first ``limit``
    test samples. ``progress`` is called after each shard with (done, total, uri). The Ray
    job ``jobs.corrupt.run_corrupt`` writes the same files in parallel.
    """
    plan = plan_make(dataset, out, corruptions, severities, data_dir=data_dir, identity=identity,
                     shard_size=shard_size, limit=limit, seed=seed, download=download,
                     image_size=image_size)
    summary = write_in_process(plan, write_task, progress)
    log.info("wrote %d shards (%d rows) to %s", len(plan.tasks), summary.rows, out)
    return summary


def write_in_process(plan, task_fn, progress: Progress | None = None):
    """Run ``task_fn(plan, task)`` for every task of ``plan`` here, in order; on any failure
    (or Ctrl-C) remove what was written. The plan's summary."""
    written: list[str] = []
    try:
        for task in plan.tasks:
            written.append(task.uri)  # before writing: a failed write is cleaned up too
            task_fn(plan, task)
            if progress is not None:
                progress(len(written), len(plan.tasks), task.uri)
    except BaseException:
        remove_written(plan, written)
        raise
    return plan.summary()


def remove_written(plan: MakePlan, uris: Iterable[str]) -> None:
    """Undo a failed run: remove ``uris``, hidden temp files of killed writers of planned
    files, and ``out`` itself if the run created it and it is empty."""
    for uri in uris:
        try:
            storage.remove(uri)
        except TTTPipeError as exc:  # keep cleaning; the original error is what matters
            log.warning("could not remove %s: %s", uri, exc)
    if storage.is_uri(plan.out):
        return
    folder = os.path.abspath(os.path.expanduser(plan.out))
    planned = {storage.basename(t.uri) for t in plan.tasks}
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:  # `.<file>.<random>.tmp` of pipeline.storage's atomic writer
        if name.startswith(".") and name.endswith(".tmp") and \
                name[1:].split(".parquet.")[0] + ".parquet" in planned:
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass
    if plan.created_out:
        try:
            os.rmdir(folder)
        except OSError:
            pass  # not empty (someone else wrote there) or already gone


def _read_rows(plan: MakePlan, lo: int, hi: int):
    ids, labels, images = [], [], []
    for i, y, x in iter_split(plan.spec, "test", plan.data_dir, batch=hi - lo,
                              rows=slice(lo, hi), download=plan.download):
        ids.append(i)
        labels.append(y)
        images.append(x)
    if not ids or sum(len(i) for i in ids) != hi - lo:
        raise TTTPipeError(f"the {plan.spec.name} test split changed while shards were made "
                           f"(rows {lo}..{hi - 1} not found); rerun ttt-pipe corrupt")
    unlabelled = any(y is None for y in labels)
    return (np.concatenate(ids), None if unlabelled else np.concatenate(labels),
            np.concatenate(images))


def _split_length(spec: DatasetSpec, data_dir: str | None, download: bool | None) -> int:
    """The test split's size (also checks the files are there): image folders are listed,
    not decoded; the small datasets (IDX, CIFAR) are read once in the planning process."""
    return split_length(spec, "test", data_dir=data_dir, download=download)


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise TTTPipeError(f"{name} must be a positive integer, got {value!r}")


def _prepare_out(out: str, planned: set[str]) -> bool:
    """Create ``out``; refuse one holding other shards. True if this call created it."""
    existed = storage.exists(out)
    if existed and not storage.is_dir(out):
        raise TTTPipeError(f"--out '{out}' is a file; choose a folder")
    if existed:
        others = [u for u in storage.list_files(out, SUFFIX)
                  if storage.basename(u) not in planned]
        if others:
            raise TTTPipeError(
                f"--out '{out}' already holds {len(others)} other shard file(s) (e.g. "
                f"{storage.basename(others[0])}); choose an empty folder or delete them")
    storage.makedirs(out)
    return not existed
