"""Make a set of shards: test split -> corruptions x severities -> Parquet files.

:func:`make_shards` validates every argument and loads the data before it writes anything,
writes one file per (corruption, severity, chunk of ``shard_size`` samples) named
``<corruption>-s<severity>-<index:05d>.parquet`` (``identity`` once, at severity 0), and on
any failure (or Ctrl-C) removes every file it wrote, so a folder never holds a partial set.
The same arguments give byte-identical files: corruptions are seeded per sample, and the
Parquet writer options are pinned (:data:`pipeline.storage.PARQUET_OPTIONS`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from pipeline import storage
from pipeline.corruptions import corrupt, parse_corruptions, parse_severities
from pipeline.datasets import load_split, to_float
from pipeline.errors import TTTPipeError
from pipeline.shards import SUFFIX, shard_name, write_shard

__all__ = ["ShardSummary", "make_shards", "plan_shards", "DEFAULT_SHARD_SIZE"]

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 2000
IDENTITY = "identity"

Progress = Callable[[int, int, str], None]  # (shards done, shards total, uri just written)


@dataclass(frozen=True)
class ShardSummary:
    """What :func:`make_shards` wrote."""

    out: str
    dataset: str
    shards: list[str] = field(default_factory=list)  # uris, in writing order
    pairs: list[tuple[str, int]] = field(default_factory=list)  # (corruption, severity)
    samples: int = 0  # test samples per (corruption, severity)
    rows: int = 0  # rows over all shards

    @property
    def bytes(self) -> int:
        total = 0
        for uri in self.shards:
            fs, path = storage.resolve(uri)
            total += fs.get_file_info(path).size or 0
        return total


def plan_shards(corruptions: str | Iterable[str], severities: str | Iterable[int],
                identity: bool = True) -> list[tuple[str, int]]:
    """The (corruption, severity) pairs to write, in order: identity (severity 0) first."""
    names = parse_corruptions(corruptions)
    levels = sorted(parse_severities(severities))
    pairs = [(IDENTITY, 0)] if identity or IDENTITY in names else []
    pairs += [(name, sev) for name in names if name != IDENTITY for sev in levels]
    return pairs


def make_shards(dataset: str, out: str, corruptions: str | Iterable[str] = "all",
                severities: str | Iterable[int] = (1, 2, 3, 4, 5), *,
                data_dir: str | os.PathLike | None = None, identity: bool = True,
                shard_size: int = DEFAULT_SHARD_SIZE, limit: int | None = None, seed: int = 0,
                download: bool | None = None, progress: Progress | None = None,
                ) -> ShardSummary:
    """Corrupt ``dataset``'s test split and write the shards under ``out`` (path or URI).

    ``corruptions``: ``"a,b"``, ``"all"`` or names; ``identity=True`` also writes the clean
    baseline once. ``limit`` keeps the first ``limit`` test samples. ``progress`` is called
    after each shard with (done, total, uri).
    """
    _check_positive("shard_size", shard_size)
    if limit is not None:
        _check_positive("limit", limit)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise TTTPipeError(f"seed must be a non-negative integer, got {seed!r}")
    pairs = plan_shards(corruptions, severities, identity)
    split = load_split(dataset, "test", data_dir=data_dir, download=download)
    n = len(split) if limit is None else min(limit, len(split))
    chunks = [(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]
    names = [shard_name(c, s, i) for c, s in pairs for i in range(len(chunks))]
    created_out = _prepare_out(out, {name + SUFFIX for name in names})

    images = to_float(split.images[:n])  # (n, C, H, W) pixel units
    sample_ids = np.arange(n, dtype=np.int64)
    spec = split.spec
    written: list[str] = []
    total = len(names)
    try:
        for corruption, severity in pairs:
            for index, (lo, hi) in enumerate(chunks):
                ids = sample_ids[lo:hi]
                x = corrupt(images[lo:hi], corruption, severity, ids, seed, spec.std[0])
                uri = storage.join(out, shard_name(corruption, severity, index) + SUFFIX)
                written.append(uri)  # before writing: a failed write is cleaned up too
                write_shard(uri, ids, split.labels[lo:hi], x, corruption=corruption,
                            severity=severity, dataset=spec.name, mean=spec.mean[0],
                            std=spec.std[0], seed=int(seed))
                if progress is not None:
                    progress(len(written), total, uri)
    except BaseException:
        _remove(written, out if created_out else None)
        raise
    log.info("wrote %d shards (%d rows) to %s", len(written), n * len(pairs), out)
    return ShardSummary(out=str(out), dataset=spec.name, shards=written, pairs=pairs,
                        samples=n, rows=n * len(pairs))


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


def _remove(uris: list[str], created_dir: str | None) -> None:
    for uri in uris:
        try:
            storage.remove(uri)
        except TTTPipeError as exc:  # keep cleaning; the original error is what matters
            log.warning("could not remove %s: %s", uri, exc)
    if created_dir is not None and not storage.is_uri(created_dir):
        try:
            os.rmdir(os.path.abspath(os.path.expanduser(created_dir)))
        except OSError:
            pass  # not empty (someone else wrote there) or already gone
