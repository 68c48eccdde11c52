"""Test helpers shared by every layer: synthetic digit images and IDX files.

Import as ``from helpers import make_idx, synthetic_digits`` (tests/ is on sys.path because
tests/conftest.py lives there and tests/ has no __init__.py).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

__all__ = ["SEGMENTS", "synthetic_digits", "idx_bytes", "write_idx_file", "make_idx",
           "write_dataset", "HOST_READS", "count_host_reads"]

# Seven-segment glyphs: segment -> (row0, row1, col0, col1) in a 20x12 box; digit -> segments.
_BOX = {"a": (0, 3, 1, 11), "b": (1, 10, 9, 12), "c": (10, 19, 9, 12), "d": (17, 20, 1, 11),
        "e": (10, 19, 0, 3), "f": (1, 10, 0, 3), "g": (8, 11, 1, 11)}
SEGMENTS = ["abcdef", "bc", "abdeg", "abcdg", "bcfg", "acdfg", "acdefg", "abc", "abcdefg",
            "abcdfg"]


def synthetic_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` digit-like 28x28 uint8 images and int64 labels 0..9 (balanced, shuffled).

    Each image is its label's seven-segment glyph, shifted by up to 3 px, with random stroke
    brightness and light noise: easy enough that a tiny CNN beats chance after one epoch,
    varied enough that it is not a lookup.
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 10).astype(np.int64)
    images = np.zeros((n, 28, 28), np.float32)
    for i, label in enumerate(labels):
        top, left = 4 + rng.integers(-3, 4), 8 + rng.integers(-3, 4)
        for segment in SEGMENTS[label]:
            r0, r1, c0, c1 = _BOX[segment]
            images[i, top + r0:top + r1, left + c0:left + c1] = rng.uniform(0.6, 1.0)
    images += rng.normal(0.0, 0.05, images.shape)
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8), labels


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in the IDX format (magic 0x0000080N, big-endian dims, data)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.tobytes()


def write_idx_file(path: str | Path, array: np.ndarray, gz: bool = False) -> Path:
    """Write one IDX file (gzipped if ``gz``; ``.gz`` is appended to the name)."""
    path = Path(f"{path}.gz" if gz else path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(array)
    if gz:
        with gzip.GzipFile(path, "wb", mtime=0) as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def make_idx(path: str | Path, images: np.ndarray, labels: np.ndarray, gz: bool = False,
             split: str = "train") -> Path:
    """Write ``split``'s images and labels into folder ``path`` under the MNIST file names.

    ``split`` is ``"train"`` (``train-images-idx3-ubyte``...) or ``"test"`` (``t10k-...``).
    Returns the folder.
    """
    prefix = {"train": "train", "test": "t10k"}[split]
    folder = Path(path)
    write_idx_file(folder / f"{prefix}-images-idx3-ubyte", images, gz)
    write_idx_file(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)
    return folder


def write_dataset(folder: str | Path, n_train: int = 64, n_test: int = 32, gz: bool = False,
                  seed: int = 0) -> Path:
    """A complete synthetic dataset (both splits) in ``folder``."""
    make_idx(folder, *synthetic_digits(n_train, seed), gz=gz, split="train")
    make_idx(folder, *synthetic_digits(n_test, seed + 1), gz=gz, split="test")
    return Path(folder)


# Every torch.Tensor method that copies a value back to the host (a CPU-GPU sync on a GPU).
HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


def count_host_reads(monkeypatch) -> list[str]:
    """Patch every `HOST_READS` method to log its name; returns the (live) log, in call order.

    On the CPU a host read is free but still a call, so a test can count the reads a loop
    would make on a GPU. `monkeypatch.undo()` stops the counting.
    """
    import torch

    calls: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls
