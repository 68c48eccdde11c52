"""CIFAR-10 and CIFAR-100 from the official files, the binary or the python version.

Layouts (https://www.cs.toronto.edu/~kriz/cifar.html), each searched as ``<root>/<folder>``,
``<root>/<dataset name>/<folder>`` and ``<root>`` itself:

- CIFAR-10 binary ``cifar-10-batches-bin/``: ``data_batch_1.bin`` .. ``data_batch_5.bin``,
  ``test_batch.bin``; records of 1 label byte + 3072 pixel bytes (1024 R, 1024 G, 1024 B,
  row-major 32x32); ``batches.meta.txt`` (class names, optional).
- CIFAR-10 python ``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5``,
  ``test_batch`` (pickled dicts: ``data`` uint8 (N, 3072), ``labels``), ``batches.meta``.
- CIFAR-100 binary ``cifar-100-binary/``: ``train.bin``, ``test.bin``; records of a coarse and
  a fine label byte + 3072 pixel bytes; ``fine_label_names.txt`` (optional).
- CIFAR-100 python ``cifar-100-python/``: ``train``, ``test`` (``data``, ``fine_labels``,
  ``coarse_labels``), ``meta``.

The binary version is read directly with numpy and preferred when both are present. The
python version is unpickled by :class:`CifarUnpickler`, which admits only what a CIFAR batch
holds (numpy's array reconstruction: ``_reconstruct``, ``ndarray``, ``dtype``; and
``_codecs.encode`` restricted to latin-1, which Python 3 writes for bytes in protocol-2
pickles); any other
global in the pickle is refused before anything is called ("not a CIFAR batch: it pickles
<module.name>"). Labels are the fine labels for CIFAR-100.

Search order: ``data_dir`` only if given, else ``$TTT_PIPE_DATA``, then the cache, then
torchvision's real download (``torchvision.datasets.CIFAR10/100(download=True)`` into the
cache, which leaves ``cifar-10-batches-py/`` there) where downloading is allowed.

Normalisation: the per-channel mean and standard deviation of the training set's pixels in
[0, 1] (CIFAR-10 mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616); CIFAR-100 mean
(0.5071, 0.4865, 0.4409), std (0.2673, 0.2564, 0.2762)) -- the population std over all
pixels, not the often-copied per-image average (0.2023, 0.1994, 0.2010).
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.datasets import base
from pipeline.datasets.base import (DatasetSpec, Split, check_split, download_allowed, one_line,
                                    search_roots)
from pipeline.errors import TTTPipeError

__all__ = ["SPECS", "CifarUnpickler", "load", "find_data_dir", "read_python_batch",
           "read_binary_batch"]

log = logging.getLogger(__name__)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
CIFAR100_CLASSES = tuple("""
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile
cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp
lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree
orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum
rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider
squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train
trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split())

_PIXELS = 3 * 32 * 32

SPECS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(
        name="cifar10", num_classes=10, image_shape=(3, 32, 32),
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
        classes=CIFAR10_CLASSES, suite="imagenet-c", form="cifar10"),
    "cifar100": DatasetSpec(
        name="cifar100", num_classes=100, image_shape=(3, 32, 32),
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
        classes=CIFAR100_CLASSES, suite="imagenet-c", form="cifar100"),
}


@dataclass(frozen=True)
class _Layout:
    folder: str  # the official folder name
    binary: bool
    files: dict[str, tuple[str, ...]]  # split -> batch files
    meta: str  # the class-names file
    label_key: str = "labels"  # python version: the key of the labels


_LAYOUTS = {
    "cifar10": (
        _Layout("cifar-10-batches-bin", True,
                {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
                 "test": ("test_batch.bin",)}, "batches.meta.txt"),
        _Layout("cifar-10-batches-py", False,
                {"train": tuple(f"data_batch_{i}" for i in range(1, 6)),
                 "test": ("test_batch",)}, "batches.meta"),
    ),
    "cifar100": (
        _Layout("cifar-100-binary", True, {"train": ("train.bin",), "test": ("test.bin",)},
                "fine_label_names.txt"),
        _Layout("cifar-100-python", False, {"train": ("train",), "test": ("test",)}, "meta",
                label_key="fine_labels"),
    ),
}
_TORCHVISION_CLS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def load(spec: DatasetSpec, split: str, data_dir: str | os.PathLike | None = None,
         download: bool | None = None) -> Split:
    """Read one split of CIFAR-10/100 as uint8 (N, 3, 32, 32) images and int64 labels."""
    check_split(split)
    folder, layout = find_data_dir(spec.name, data_dir=data_dir, download=download)
    _check_meta(folder / layout.meta, spec, layout.binary)
    parts = []
    for file in layout.files[split]:
        path = folder / file
        parts.append(read_binary_batch(path, spec.name) if layout.binary
                     else read_python_batch(path, layout.label_key))
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise TTTPipeError(f"{folder} has labels outside 0..{spec.num_classes - 1}; "
                           f"these are not the {spec.name} files")
    log.info("loaded %s %s: %d images from %s", spec.name, split, len(labels), folder)
    return Split(images=images, labels=labels, spec=spec, source=str(folder))


def find_data_dir(name: str, data_dir: str | os.PathLike | None = None,
                  download: bool | None = None) -> tuple[Path, _Layout]:
    """The folder holding ``name``'s files and its layout (see the module doc)."""
    roots = search_roots(data_dir)
    for root in roots:
        for layout in _LAYOUTS[name]:
            for folder in (root / layout.folder, root / name / layout.folder, root / name, root):
                if all((folder / f).is_file() for files in layout.files.values() for f in files):
                    return folder, layout
    explicit = data_dir is not None
    if (download if explicit else download_allowed(download)):
        root = roots[0] if explicit else base.CACHE_ROOT
        error = base.torchvision_download(_TORCHVISION_CLS[name], root)
        layout = _LAYOUTS[name][1]  # torchvision fetches the python version
        folder = root / layout.folder
        if error is None and all((folder / f).is_file() for fs in layout.files.values()
                                 for f in fs):
            return folder, layout
        reason = f"download failed ({error})" if error else "download gave no files"
    else:
        reason = "download not allowed" + ("" if explicit else
                                           " (TTT_PIPE_OFFLINE or CI is set)")
    where = ", ".join(str(r) for r in roots)
    folders = " or ".join(f"{layout.folder}/" for layout in _LAYOUTS[name])
    raise TTTPipeError(f"{name} files not found in {where}; {reason}; pass --data-dir DIR "
                       f"holding {folders} from https://www.cs.toronto.edu/~kriz/cifar.html "
                       "(or set TTT_PIPE_DATA)")


def read_binary_batch(path: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A binary batch -> (uint8 images (N, 3, 32, 32), int64 labels (N,)); fine labels for
    CIFAR-100 (its records start with a coarse and a fine label byte)."""
    label_bytes = 2 if name == "cifar100" else 1
    record = label_bytes + _PIXELS
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise TTTPipeError(f"cannot read {path}: {one_line(exc)}") from None
    if len(data) == 0 or len(data) % record:
        raise TTTPipeError(f"{path} is truncated or not a {name} binary batch: {len(data)} "
                           f"bytes is not a whole number of {record}-byte records; "
                           "re-download it")
    rows = data.reshape(-1, record)
    images = rows[:, label_bytes:].reshape(-1, 3, 32, 32).copy()
    return images, rows[:, label_bytes - 1].astype(np.int64)


def read_python_batch(path: Path, label_key: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """A python-version batch -> (uint8 images (N, 3, 32, 32), int64 labels (N,))."""
    batch = _unpickle(path)
    data, labels = batch.get("data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != _PIXELS:
        got = (f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray)
               else type(data).__name__)
        raise TTTPipeError(f"{path} is not a CIFAR batch: its 'data' is {got}, not uint8 "
                           f"(N, {_PIXELS}); re-download it")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        labels = np.zeros(0)
    if labels.ndim != 1 or len(labels) != len(data):
        raise TTTPipeError(f"{path} is not a CIFAR batch: its '{label_key}' are not "
                           f"{len(data)} integers; re-download it")
    return data.reshape(-1, 3, 32, 32), labels


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that resolves only numpy's array reconstruction; anything else refused."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None


class _Refused(pickle.UnpicklingError):
    pass


def _reconstruct_fn():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _latin1_encode(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as protocol-2 pickles written by Python 3 use it for bytes."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise _Refused(f"_codecs.encode({encoding!r})")
    return text.encode("latin1")


_ALLOWED = {
    ("_codecs", "encode"): _latin1_encode,  # bytes in a protocol-2 pickle from Python 3
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_fn(),
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_fn(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = CifarUnpickler(f, encoding="latin1").load()
    except _Refused as exc:
        raise TTTPipeError(f"{path} is not a CIFAR batch: it pickles {exc}; refusing to "
                           "load it (use the official files)") from None
    except OSError as exc:
        raise TTTPipeError(f"cannot read {path}: {one_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 -- a damaged pickle raises many types
        raise TTTPipeError(f"{path} is not a readable CIFAR batch ({one_line(exc)}); "
                           "re-download it") from None
    if not isinstance(obj, dict):
        raise TTTPipeError(f"{path} is not a CIFAR batch: it holds a {type(obj).__name__}, "
                           "not a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _check_meta(path: Path, spec: DatasetSpec, binary: bool) -> None:
    """The class names in the meta file (when present) must be the dataset's."""
    if not path.is_file():
        return
    if binary:
        try:
            names = [line.strip() for line in path.read_text(encoding="latin1").splitlines()]
        except OSError as exc:
            raise TTTPipeError(f"cannot read {path}: {one_line(exc)}") from None
    else:
        key = "fine_label_names" if spec.name == "cifar100" else "label_names"
        names = _unpickle(path).get(key)
        names = [n.decode("latin1") if isinstance(n, bytes) else str(n)
                 for n in (names if isinstance(names, (list, tuple)) else [])]
    names = [n for n in names if n]
    if tuple(names) != spec.classes:
        raise TTTPipeError(f"{path} lists {len(names)} classes ({', '.join(names[:3])}, ...), "
                           f"not {spec.name}'s {spec.num_classes}; these are not the "
                           f"{spec.name} files")
