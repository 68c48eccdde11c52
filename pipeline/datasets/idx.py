"""MNIST and Fashion-MNIST: where their IDX files are, how to read them.

Where the four IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally ``.gz``) are looked
for, in order:

1. ``data_dir`` if given (``--data-dir``) -- and only there;
2. ``$TTT_PIPE_DATA``;
3. the Debian package's folder (``apt-get install dataset-fashion-mnist`` ->
   ``/usr/share/datasets/fashion-mnist``; ``/usr/share/datasets/mnist`` likewise);
4. :data:`~pipeline.datasets.base.CACHE_ROOT` (``$XDG_CACHE_HOME/ttt-pipe``, default
   ``~/.cache/ttt-pipe``), where torchvision's downloader puts them
   (``CACHE_ROOT/FashionMNIST/raw/...``).

Each of these may hold the files directly, in a ``<dataset name>/`` subfolder, or in
torchvision's layout ``<MNIST|FashionMNIST>/raw/``. If none has them, torchvision's real
download path fetches them into the cache -- only when downloading is allowed
(:func:`~pipeline.datasets.base.download_allowed`). An explicit ``data_dir`` is never
downloaded into unless ``download=True``.

The files are parsed with a small numpy IDX reader equivalent to torchvision's
``read_image_file``/``read_label_file`` that also reads gzipped files and reports damage as
a one-line :class:`~pipeline.errors.TTTPipeError` instead of an ``assert``.
"""

from __future__ import annotations

import gzip
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.datasets import base
from pipeline.datasets.base import DatasetSpec, Split, check_split, download_allowed, search_roots
from pipeline.errors import TTTPipeError

__all__ = ["SPECS", "SOURCES", "IdxSource", "load", "find_data_dir", "read_idx"]

log = logging.getLogger(__name__)

_PREFIX = {"train": "train", "test": "t10k"}


@dataclass(frozen=True)
class IdxSource:
    """Where a dataset's IDX files come from."""

    torchvision_cls: str  # class name in torchvision.datasets (also its folder name)
    debian_dir: str | None = None  # where the Debian package installs the files
    debian_package: str | None = None


SPECS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist", num_classes=10, image_shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,),
        classes=tuple(str(d) for d in range(10)), suite="mnist-c", form="mnist"),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist", num_classes=10, image_shape=(1, 28, 28), mean=(0.2860,),
        std=(0.3530,),
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot"), suite="mnist-c", form="fashion-mnist"),
}

SOURCES: dict[str, IdxSource] = {
    "mnist": IdxSource("MNIST", debian_dir="/usr/share/datasets/mnist"),
    "fashion-mnist": IdxSource("FashionMNIST", debian_dir="/usr/share/datasets/fashion-mnist",
                               debian_package="dataset-fashion-mnist"),
}


def load(spec: DatasetSpec, split: str, data_dir: str | os.PathLike | None = None,
         download: bool | None = None) -> Split:
    """Read one split of an IDX dataset as uint8 (N, 1, 28, 28) images."""
    check_split(split)
    name = spec.name
    folder = find_data_dir(name, data_dir=data_dir, download=download)
    images_path = _idx_file(folder, f"{_PREFIX[split]}-images-idx3-ubyte")
    labels_path = _idx_file(folder, f"{_PREFIX[split]}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != spec.image_shape[1:]:
        raise TTTPipeError(f"{images_path} holds images of shape {images.shape[1:]}, not "
                           f"{spec.image_shape[1:]}; pass the {name} files with --data-dir")
    if labels.ndim != 1 or len(labels) != len(images):
        raise TTTPipeError(f"{labels_path} holds {labels.shape} labels for {len(images)} "
                           f"images in {images_path}; re-download the {name} files")
    labels = labels.astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise TTTPipeError(f"{labels_path} has labels outside 0..{spec.num_classes - 1}; "
                           f"re-download the {name} files")
    log.info("loaded %s %s: %d images from %s", name, split, len(labels), folder)
    return Split(images=images[:, None], labels=labels, spec=spec, source=str(folder))


def find_data_dir(name: str, data_dir: str | os.PathLike | None = None,
                  download: bool | None = None) -> Path:
    """The folder holding ``name``'s four IDX files (see the module doc for the search)."""
    source = SOURCES[name]
    roots = search_roots(data_dir, source.debian_dir)
    for root in roots:
        for folder in (root / name, root / source.torchvision_cls / "raw", root):
            if _has_files(folder):
                return folder
    explicit = data_dir is not None
    if (download if explicit else download_allowed(download)):
        root = roots[0] if explicit else base.CACHE_ROOT
        error = base.torchvision_download(source.torchvision_cls, root)
        folder = root / source.torchvision_cls / "raw"
        if error is None and _has_files(folder):
            return folder
        reason = f"download failed ({error})" if error else "download gave no files"
    else:
        reason = "download not allowed" + ("" if explicit else
                                           " (TTT_PIPE_OFFLINE or CI is set)")
    where = ", ".join(str(r) for r in roots)
    install = (f"install them (apt-get install {source.debian_package}) or "
               if source.debian_package else "")
    raise TTTPipeError(
        f"{name} IDX files not found in {where}; {reason}; {install}pass --data-dir DIR "
        f"with {_PREFIX['train']}/{_PREFIX['test']}-images-idx3-ubyte[.gz] and -labels "
        f"files (or set TTT_PIPE_DATA)")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (``.gz`` or not) as a numpy array (uint8 for MNIST files)."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise TTTPipeError(f"cannot read IDX file {path}: {' '.join(str(exc).split())}; "
                           "re-download or reinstall it") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise TTTPipeError(f"{path} is not an IDX file (bad magic number); "
                           "re-download or reinstall it")
    dtype, ndim = np.dtype(_IDX_TYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if ndim < 1 or len(data) < header:
        raise TTTPipeError(f"{path} has a damaged IDX header; re-download or reinstall it")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape))
    if len(data) - header != count * dtype.itemsize:
        raise TTTPipeError(f"{path} is truncated or padded: header says {shape}, found "
                           f"{len(data) - header} bytes of data; re-download or reinstall it")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))  # native byte order, writable copy


_IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _has_files(folder: Path) -> bool:
    return all(_idx_file(folder, f"{prefix}-{kind}") is not None
               for prefix in _PREFIX.values()
               for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))
