"""What every dataset reader shares: the spec, a split, pixel units, where files are searched.

A :class:`DatasetSpec` is what the rest of the pipeline knows about a dataset (its identity
``name``, image shape, per-channel normalisation, classes and corruption suite); a
:class:`Split` is one split read into memory as uint8 ``(N, C, H, W)``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import TTTPipeError

__all__ = ["DatasetSpec", "Split", "CACHE_ROOT", "SPLITS", "to_float", "download_allowed",
           "search_roots", "suite_of", "check_split", "one_line",
           "torchvision_download"]

log = logging.getLogger(__name__)

CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "ttt-pipe"
SPLITS = ("train", "test")


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """What the rest of the pipeline needs to know about a dataset.

    ``name`` is the identity written to manifests and shard metadata ("mnist", "cifar10",
    "imagenet", "folder:<dirname>-<sha256(class list)[:8]>"); ``form`` is what the user
    typed (``folder:/data/pets``) so the files can be found again; it is not part of the
    identity (two mounts of the same folder give equal specs).
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]  # per channel (len C), pixel units
    std: tuple[float, ...]
    classes: tuple[str, ...]
    suite: str  # corruption suite of this data: "mnist-c" (1x28x28) or "imagenet-c" (RGB)
    form: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        c = self.image_shape[0]
        if len(self.image_shape) != 3 or len(self.mean) != c or len(self.std) != c:
            raise ValueError(f"{self.name}: image_shape {self.image_shape} needs (C, H, W) "
                             f"and {c} means/stds, got {self.mean} / {self.std}")
        if len(self.classes) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.classes)} class names for "
                             f"{self.num_classes} classes")


@dataclass(frozen=True)
class Split:
    """One split: uint8 images (N, C, H, W) and int64 labels (N,) (None: unlabelled)."""

    images: np.ndarray
    labels: np.ndarray | None
    spec: DatasetSpec
    source: str = field(default="", compare=False)  # the folder the files came from

    def __len__(self) -> int:
        return len(self.images)


def suite_of(image_shape: tuple[int, int, int]) -> str:
    """The corruption suite of images of this shape: grayscale -> mnist-c, RGB -> imagenet-c."""
    return "mnist-c" if image_shape[0] == 1 else "imagenet-c"


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 images (N, C, H, W) -> float32 (N, C, H, W) in [0, 1] ("pixel units")."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TTTPipeError(f"to_float expects uint8 images, got {images.dtype}")
    if images.ndim != 4:
        raise TTTPipeError(f"to_float expects images (N, C, H, W), got shape {images.shape}")
    return images.astype(np.float32) / np.float32(255.0)


def download_allowed(download: bool | None = None) -> bool:
    """``download`` if given; otherwise True unless ``TTT_PIPE_OFFLINE`` or ``CI`` is set."""
    if download is not None:
        return bool(download)
    return not (_truthy(os.environ.get("TTT_PIPE_OFFLINE")) or _truthy(os.environ.get("CI")))


def search_roots(data_dir: str | os.PathLike | None, *extra: str | None) -> list[Path]:
    """``[data_dir]`` if given (and only it); else ``$TTT_PIPE_DATA``, ``extra``, the cache."""
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    roots = [Path(p).expanduser() for p in (os.environ.get("TTT_PIPE_DATA"), *extra) if p]
    return roots + [CACHE_ROOT]  # looked up at call time: tests point it elsewhere


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise TTTPipeError(f"unknown split '{split}'; choose from: {', '.join(SPLITS)}")
    return split


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (its last non-empty line, at most 200 chars)."""
    lines = [" ".join(line.split()) for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no")


def torchvision_download(cls_name: str, root: Path) -> str | None:
    """Fetch ``torchvision.datasets.<cls_name>`` into ``root``; the error as one line, or None.

    Folders this call created are removed again when it fails.
    """
    import socket

    import torchvision.datasets  # heavy: only when downloading

    log.info("downloading %s into %s", cls_name, root)
    new_folders = [f for f in (root, root / cls_name, root / cls_name / "raw") if not f.exists()]
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)  # urllib has no timeout of its own
    try:
        getattr(torchvision.datasets, cls_name)(str(root), train=False, download=True)
    except Exception as exc:  # noqa: BLE001 -- any failure becomes one reported line
        for folder in reversed(new_folders):  # leave no empty folders behind
            try:
                folder.rmdir()
            except FileNotFoundError:
                continue  # never made (CIFAR has no <Cls>/raw)
            except OSError:
                break  # not empty: keep it and its parents
        return one_line(exc)
    finally:
        socket.setdefaulttimeout(previous)
    return None


_DOWNLOAD_TIMEOUT_S = 30.0
