"""The datasets: one spec per dataset form, and the readers of their files.

Forms accepted by :func:`get_dataset` (and the CLI's ``--dataset``):

- ``mnist``, ``fashion-mnist`` -- IDX files (:mod:`pipeline.datasets.idx`);

Every reader searches ``data_dir`` (``--data-dir``) only if given, else ``$TTT_PIPE_DATA``,
then the cache (:data:`CACHE_ROOT`), then torchvision's real download where allowed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from pipeline.datasets import idx
from pipeline.datasets.base import (CACHE_ROOT, SPLITS, DatasetSpec, Split, download_allowed,
                                    to_float)
from pipeline.datasets.idx import find_data_dir, read_idx
from pipeline.errors import TTTPipeError

__all__ = ["DatasetSpec", "DATASETS", "Split", "CACHE_ROOT", "SPLITS", "get_dataset",
           "list_datasets", "dataset_forms", "find_data_dir", "load_split", "iter_split",
           "read_idx", "to_float", "download_allowed"]

DATASETS: dict[str, DatasetSpec] = {**idx.SPECS}
_READERS = {**{name: idx.load for name in idx.SPECS}}


def list_datasets() -> list[str]:
    """The fixed dataset names (the forms without a path)."""
    return sorted(DATASETS)


def dataset_forms() -> list[str]:
    """Every accepted form, as shown in ``--help``."""
    return list_datasets()


def get_dataset(form: str | DatasetSpec, image_size: int | None = None) -> DatasetSpec:
    """The spec of ``form``; a one-line TTTPipeError listing the valid forms otherwise."""
    if isinstance(form, DatasetSpec):
        return form
    form = str(form)
    if form in DATASETS:
        spec = DATASETS[form]
        if image_size is not None and image_size != spec.image_shape[1]:
            raise TTTPipeError(f"{form} images are {spec.image_shape[1]}x{spec.image_shape[2]}; "
                               "--image-size only applies to folder:PATH and imagenet")
        return spec
    raise TTTPipeError(f"unknown dataset '{form}'; choose from: {', '.join(dataset_forms())}")


def load_split(name: str | DatasetSpec, split: str = "test",
               data_dir: str | os.PathLike | None = None, download: bool | None = None,
               image_size: int | None = None) -> Split:
    """Read one split (``"train"`` or ``"test"``) of dataset ``name`` (a form or a spec)."""
    spec = get_dataset(name, image_size)
    return _reader(spec)(spec, split, data_dir=data_dir, download=download)


def iter_split(name: str | DatasetSpec, split: str = "test",
               data_dir: str | os.PathLike | None = None, *, batch: int = 256,
               rows: slice | None = None, download: bool | None = None,
               image_size: int | None = None,
               ) -> Iterator[tuple[np.ndarray, np.ndarray | None, np.ndarray]]:
    """Yield ``(sample_ids int64 (n,), labels int64 (n,) or None, uint8 images (n, C, H, W))``
    in batches of at most ``batch``; ``rows`` restricts to a slice of the split's samples."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise TTTPipeError(f"batch must be a positive integer, got {batch!r}")
    spec = get_dataset(name, image_size)
    data = load_split(spec, split, data_dir=data_dir, download=download)
    ids = np.arange(len(data), dtype=np.int64)[rows or slice(None)]
    for start in range(0, len(ids), batch):
        chunk = ids[start:start + batch]
        labels = None if data.labels is None else data.labels[chunk]
        yield chunk, labels, data.images[chunk]


def _reader(spec: DatasetSpec):
    return _READERS[spec.name]
