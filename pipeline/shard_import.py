"""Released corrupted benchmarks (CIFAR-10/100-C, ImageNet-C) -> shards, as they were released.

Like :mod:`pipeline.shard_maker`, two steps so a Ray job (:mod:`jobs.corrupt`) can fan out:

- :func:`plan_import_shards` validates the arguments, plans the (corruption, severity) units
  with :func:`pipeline.datasets.importers.plan_import` (headers and file lists only, no
  pixels; a seeded row shuffle, ``limit`` a seeded subset) and cuts each unit into shard
  files of ``shard_size`` rows: ``<corruption>-s<severity>-<index:05d>.parquet``.
- :func:`write_import_task` reads one file's rows (:func:`~pipeline.datasets.importers.read_unit`)
  and writes them atomically, uint8, suite ``imagenet-c``, ``shuffle_seed`` and
  ``source = import:<layout>:<id source>`` in the metadata. Memory: one shard per task.

The default ``shard_size`` keeps a shard at about :data:`TARGET_SHARD_BYTES` of pixels
(224x224x3: 996 images, ~150 MB; 32x32x3: the whole 10,000-image unit, 31 MB).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from pipeline import storage
from pipeline.datasets import DatasetSpec, get_dataset
from pipeline.datasets.importers import ImportUnit, plan_import, read_unit
from pipeline.errors import TTTPipeError
from pipeline.shard_maker import ShardSummary, _check_positive, _prepare_out
from pipeline.shards import SUFFIX, shard_name, write_shard

__all__ = ["TARGET_SHARD_BYTES", "ImportTask", "ImportPlan", "default_shard_size",
           "plan_import_shards", "write_import_task", "import_shards"]

TARGET_SHARD_BYTES = 150_000_000


def default_shard_size(image_shape: tuple[int, int, int]) -> int:
    """Rows per shard so that a shard holds about TARGET_SHARD_BYTES of uint8 pixels."""
    return max(1, TARGET_SHARD_BYTES // int(np.prod(image_shape)))


@dataclass(frozen=True)
class ImportTask:
    """One shard file: a contiguous slice of a unit's (shuffled) row order."""

    uri: str
    unit: ImportUnit  # cut to this file's rows (ImportUnit.part: small to send to a task)

    @property
    def corruption(self) -> str:
        return self.unit.corruption

    @property
    def severity(self) -> int:
        return self.unit.severity


@dataclass(frozen=True)
class ImportPlan:
    spec: DatasetSpec
    layout: str
    src: str
    out: str
    seed: int
    units: int
    samples: int  # rows per (corruption, severity)
    pairs: list[tuple[str, int]]
    tasks: list[ImportTask]
    created_out: bool = False

    def summary(self) -> ShardSummary:
        return ShardSummary(out=self.out, dataset=self.spec.name, shards=[t.uri for t in self.tasks],
                            pairs=list(self.pairs), samples=self.samples,
                            rows=sum(len(t.unit) for t in self.tasks), suite="imagenet-c")


def plan_import_shards(layout: str, src: str | os.PathLike, dataset: str | DatasetSpec, out: str,
                       corruptions: str | Iterable[str] = "all",
                       severities: str | Iterable[int] = (1, 2, 3, 4, 5), *,
                       limit: int | None = None, shard_size: int | None = None, seed: int = 0,
                       data_dir: str | os.PathLike | None = None,
                       image_size: int | None = None) -> ImportPlan:
    """Validate, plan the units, list one task per shard file; creates ``out`` (empty) only."""
    if shard_size is not None:
        _check_positive("shard_size", shard_size)
    spec = get_dataset(dataset, image_size)
    units = plan_import(layout, src, spec, corruptions, severities, limit=limit, seed=seed,
                        data_dir=data_dir)
    if not units:
        raise TTTPipeError(f"nothing to import from {src}: no selected (corruption, severity)")
    size = shard_size or default_shard_size(units[0].image_shape)
    tasks = []
    for unit in units:
        for index, lo in enumerate(range(0, len(unit), size)):
            piece = unit.part(slice(lo, min(lo + size, len(unit))))  # only this file's rows
            tasks.append(ImportTask(storage.join(out, shard_name(unit.corruption, unit.severity,
                                                                 index) + SUFFIX), piece))
    created = _prepare_out(out, {storage.basename(t.uri) for t in tasks})
    return ImportPlan(spec=spec, layout=layout, src=str(src), out=str(out), seed=int(seed),
                      units=len(units), samples=len(units[0]),
                      pairs=[(u.corruption, u.severity) for u in units], tasks=tasks,
                      created_out=created)


def write_import_task(plan: ImportPlan, task: ImportTask) -> dict:
    """Read one shard's rows of the released files and write them (uint8, as released)."""
    ids, labels, images = read_unit(task.unit)
    unit = task.unit
    write_shard(task.uri, ids, labels, images, corruption=unit.corruption, severity=unit.severity,
                dataset=plan.spec.name, mean=plan.spec.mean, std=plan.spec.std, seed=plan.seed,
                suite="imagenet-c", shuffle_seed=unit.shuffle_seed,
                source=f"import:{plan.layout}:{unit.id_source}")
    return {"uri": task.uri, "rows": len(ids)}


def import_shards(*args, progress=None, **kwargs) -> ShardSummary:
    """:func:`plan_import_shards` + every task in this process (no Ray); the job is
    ``jobs.corrupt.run_import``. Removes what it wrote on failure."""
    from pipeline.shard_maker import write_in_process

    return write_in_process(plan_import_shards(*args, **kwargs), write_import_task, progress)
