"""The datasets: one spec per dataset form, and the readers of their files.

Forms accepted by :func:`get_dataset` (and the CLI's ``--dataset``):

- ``mnist``, ``fashion-mnist`` -- IDX files, 1x28x28 (:mod:`pipeline.datasets.idx`);
- ``cifar10``, ``cifar100`` -- the official binary or python files, 3x32x32
  (:mod:`pipeline.datasets.cifar`);
- ``imagenet`` -- ILSVRC2012 ``train/`` + ``val/`` in wnid folders, 3xSxS;
- ``folder:PATH`` -- an ImageFolder tree, 3xSxS (:mod:`pipeline.datasets.folder`); ``S`` is
  ``image_size`` (default 224: Resize(256) + CenterCrop(224)).

Every reader searches ``data_dir`` (``--data-dir``) only if given, else ``$TTT_PIPE_DATA``,
then the cache (:data:`CACHE_ROOT`), then torchvision's real download where allowed
(IDX, CIFAR). :func:`load_split` reads a split into memory; :func:`iter_split` streams it in
batches (bounded memory for big folders).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from pipeline.datasets import cifar, folder, idx
from pipeline.datasets.base import (CACHE_ROOT, SPLITS, DatasetSpec, Split, download_allowed,
                                    to_float)
from pipeline.datasets.folder import class_names, imagenet_wnids
from pipeline.datasets.idx import find_data_dir, read_idx
from pipeline.errors import TTTPipeError

__all__ = ["DatasetSpec", "DATASETS", "Split", "CACHE_ROOT", "SPLITS", "FOLDER_PREFIX",
           "get_dataset", "list_datasets", "dataset_forms", "find_data_dir", "load_split",
           "iter_split", "split_length", "read_idx", "to_float", "download_allowed",
           "class_names", "imagenet_wnids"]

FOLDER_PREFIX = "folder:"
# the fixed-shape datasets; imagenet and folder:PATH take an image size
DATASETS: dict[str, DatasetSpec] = {**idx.SPECS, **cifar.SPECS}
_SIZED = ("imagenet",)


def list_datasets() -> list[str]:
    """The dataset names without a path (``folder:PATH`` is the one form with a path)."""
    return sorted([*DATASETS, *_SIZED])


def dataset_forms() -> list[str]:
    """Every accepted form, as shown in ``--help``."""
    return [*list_datasets(), f"{FOLDER_PREFIX}PATH"]


def get_dataset(form: str | DatasetSpec, image_size: int | None = None) -> DatasetSpec:
    """The spec of ``form``; a one-line TTTPipeError listing the valid forms otherwise.

    A spec passes through (``image_size`` must then be None or its size)."""
    if isinstance(form, DatasetSpec):
        if image_size is not None and image_size != form.image_shape[1]:
            return get_dataset(form.form, image_size)
        return form
    form = str(form)
    if form in DATASETS:
        spec = DATASETS[form]
        if image_size is not None and image_size != spec.image_shape[1]:
            raise TTTPipeError(f"{form} images are {spec.image_shape[1]}x{spec.image_shape[2]}; "
                               "--image-size only applies to folder:PATH and imagenet")
        return spec
    if form == "imagenet":
        return folder.imagenet_spec(image_size)
    if form.startswith(FOLDER_PREFIX) and len(form) > len(FOLDER_PREFIX):
        return folder.folder_spec(form[len(FOLDER_PREFIX):], image_size)
    raise TTTPipeError(f"unknown dataset '{form}'; choose from: {', '.join(dataset_forms())}")


def load_split(name: str | DatasetSpec, split: str = "test",
               data_dir: str | os.PathLike | None = None, download: bool | None = None,
               image_size: int | None = None) -> Split:
    """Read one split (``"train"`` or ``"test"``) of dataset ``name`` (a form or a spec)
    into memory: uint8 images (N, C, H, W), int64 labels (N,)."""
    spec = get_dataset(name, image_size)
    return _module(spec).load(spec, split, data_dir=data_dir, download=download)


def iter_split(name: str | DatasetSpec, split: str = "test",
               data_dir: str | os.PathLike | None = None, *, batch: int = 256,
               rows: slice | None = None, download: bool | None = None,
               image_size: int | None = None,
               ) -> Iterator[tuple[np.ndarray, np.ndarray | None, np.ndarray]]:
    """Yield ``(sample_ids int64 (n,), labels int64 (n,) or None, uint8 images (n, C, H, W))``
    in batches of at most ``batch``; ``rows`` restricts to a slice of the split's samples.

    Image folders (``imagenet``, ``folder:PATH``) decode one batch at a time, so memory stays
    at one batch; the other datasets are small and read whole first."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise TTTPipeError(f"batch must be a positive integer, got {batch!r}")
    spec = get_dataset(name, image_size)
    if _module(spec) is folder:
        yield from folder.iterate(spec, split, data_dir, batch=batch, rows=rows)
        return
    data = load_split(spec, split, data_dir=data_dir, download=download)
    ids = np.arange(len(data), dtype=np.int64)[rows or slice(None)]
    for start in range(0, len(ids), batch):
        chunk = ids[start:start + batch]
        labels = None if data.labels is None else data.labels[chunk]
        yield chunk, labels, data.images[chunk]


def split_length(name: str | DatasetSpec, split: str = "test",
                 data_dir: str | os.PathLike | None = None, download: bool | None = None,
                 image_size: int | None = None) -> int:
    """The number of samples in a split (image folders: listed, not decoded)."""
    spec = get_dataset(name, image_size)
    if _module(spec) is folder:
        return folder.split_length(spec, split, data_dir)
    return len(load_split(spec, split, data_dir=data_dir, download=download))


def _module(spec: DatasetSpec):
    if spec.name in idx.SPECS:
        return idx
    if spec.name in cifar.SPECS:
        return cifar
    return folder
