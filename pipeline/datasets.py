"""The datasets (MNIST, Fashion-MNIST): where their IDX files are, how to read them.

Where the four IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally ``.gz``) are looked
for, in order:

1. ``data_dir`` if given (``--data-dir``) -- and only there;
2. ``$TTT_PIPE_DATA``;
3. the Debian package's folder (``apt-get install dataset-fashion-mnist`` ->
   ``/usr/share/datasets/fashion-mnist``; ``/usr/share/datasets/mnist`` likewise);
4. :data:`CACHE_ROOT` (``$XDG_CACHE_HOME/ttt-pipe``, default ``~/.cache/ttt-pipe``), where
   torchvision's downloader puts them (``CACHE_ROOT/FashionMNIST/raw/...``).

Each of these may hold the files directly, in a ``<dataset name>/`` subfolder, or in
torchvision's layout ``<MNIST|FashionMNIST>/raw/``. If none has them, torchvision's real
download path fetches them into :data:`CACHE_ROOT` -- only when downloading is allowed:
``download=True``, or ``download=None`` (the default) unless ``TTT_PIPE_OFFLINE=1`` or
``CI`` is set. An explicit ``data_dir`` is never downloaded into unless ``download=True``.

The files are parsed with a small numpy IDX reader equivalent to torchvision's
``read_image_file``/``read_label_file`` that also reads gzipped files and reports damage as
a one-line :class:`~pipeline.errors.TTTPipeError` instead of an ``assert``.
"""

from __future__ import annotations

import gzip
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import TTTPipeError

__all__ = ["DatasetSpec", "DATASETS", "Split", "CACHE_ROOT", "get_dataset", "list_datasets",
           "find_data_dir", "load_split", "read_idx", "to_float", "download_allowed"]

log = logging.getLogger(__name__)

CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "ttt-pipe"
_PREFIX = {"train": "train", "test": "t10k"}
_DOWNLOAD_TIMEOUT_S = 30.0


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """What the rest of the pipeline needs to know about a dataset."""

    name: str
    num_classes: int = 10
    image_shape: tuple[int, int, int] = (1, 28, 28)
    mean: float
    std: float
    classes: tuple[str, ...]
    torchvision_cls: str  # class name in torchvision.datasets (also its folder name)
    debian_dir: str | None = None  # where the Debian package installs the files
    debian_package: str | None = None


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist", mean=0.1307, std=0.3081, classes=tuple(str(d) for d in range(10)),
        torchvision_cls="MNIST", debian_dir="/usr/share/datasets/mnist"),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist", mean=0.2860, std=0.3530,
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot"),
        torchvision_cls="FashionMNIST", debian_dir="/usr/share/datasets/fashion-mnist",
        debian_package="dataset-fashion-mnist"),
}


@dataclass(frozen=True)
class Split:
    """One split of a dataset: uint8 images (N, 28, 28) and int64 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray
    spec: DatasetSpec
    source: str = field(default="", compare=False)  # the folder the files came from

    def __len__(self) -> int:
        return len(self.labels)


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def get_dataset(name: str) -> DatasetSpec:
    """The spec of ``name``; TTTPipeError listing the valid names otherwise."""
    try:
        return DATASETS[str(name)]
    except KeyError:
        raise TTTPipeError(f"unknown dataset '{name}'; choose from: "
                           f"{', '.join(list_datasets())}") from None


def download_allowed(download: bool | None = None) -> bool:
    """``download`` if given; otherwise True unless ``TTT_PIPE_OFFLINE`` or ``CI`` is set."""
    if download is not None:
        return bool(download)
    return not (_truthy(os.environ.get("TTT_PIPE_OFFLINE")) or _truthy(os.environ.get("CI")))


def load_split(name: str, split: str = "test", data_dir: str | os.PathLike | None = None,
               download: bool | None = None) -> Split:
    """Read one split (``"train"`` or ``"test"``) of dataset ``name``."""
    spec = get_dataset(name)
    if split not in _PREFIX:
        raise TTTPipeError(f"unknown split '{split}'; choose from: train, test")
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
    return Split(images=images, labels=labels, spec=spec, source=str(folder))


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 images (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1] ("pixel units")."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TTTPipeError(f"to_float expects uint8 images, got {images.dtype}")
    return (images.astype(np.float32) / np.float32(255.0))[:, None, :, :]


def find_data_dir(name: str, data_dir: str | os.PathLike | None = None,
                  download: bool | None = None) -> Path:
    """The folder holding ``name``'s four IDX files (see the module doc for the search)."""
    spec = get_dataset(name)
    if data_dir is not None:
        roots = [Path(data_dir).expanduser()]
    else:
        roots = [Path(p).expanduser() for p in (os.environ.get("TTT_PIPE_DATA"),
                                                spec.debian_dir) if p]
        roots.append(CACHE_ROOT)
    for root in roots:
        for folder in _candidates(root, spec):
            if _has_files(folder):
                return folder
    explicit = data_dir is not None
    if (download if explicit else download_allowed(download)):
        root = roots[0] if explicit else CACHE_ROOT
        error = _download(spec, root)
        folder = root / spec.torchvision_cls / "raw"
        if error is None and _has_files(folder):
            return folder
        reason = f"download failed ({error})" if error else "download gave no files"
    else:
        reason = "download not allowed" + ("" if explicit else
                                           " (TTT_PIPE_OFFLINE or CI is set)")
    where = ", ".join(str(r) for r in roots)
    install = (f"install them (apt-get install {spec.debian_package}) or "
               if spec.debian_package else "")
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


def _candidates(root: Path, spec: DatasetSpec) -> list[Path]:
    return [root / spec.name, root / spec.torchvision_cls / "raw", root]


def _idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _has_files(folder: Path) -> bool:
    return all(_idx_file(folder, f"{prefix}-{kind}") is not None
               for prefix in _PREFIX.values()
               for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))


def _download(spec: DatasetSpec, root: Path) -> str | None:
    """Fetch the files with torchvision into ``root``; the error as one line, or None."""
    import torchvision.datasets  # heavy: only when downloading

    log.info("downloading %s into %s", spec.name, root)
    folders = [root, root / spec.torchvision_cls, root / spec.torchvision_cls / "raw"]
    new_folders = [f for f in folders if not f.exists()]
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)  # urllib has no timeout of its own
    try:
        getattr(torchvision.datasets, spec.torchvision_cls)(str(root), train=False,
                                                            download=True)
    except Exception as exc:  # noqa: BLE001 -- any failure becomes one reported line
        for folder in reversed(new_folders):  # leave no empty folders behind
            try:
                folder.rmdir()
            except OSError:
                break
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        return (lines[-1] if lines else type(exc).__name__)[:200]
    finally:
        socket.setdefaulttimeout(previous)
    return None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no")
