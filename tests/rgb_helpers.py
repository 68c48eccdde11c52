"""Tiny RGB datasets in their real on-disk formats, written by the tests themselves."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def cifar_arrays(n: int, num_classes: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = (np.arange(n) % num_classes).astype(np.int64)
    rng.shuffle(labels)
    return images, labels


def write_cifar_python(root: Path, name: str = "cifar10", n_train: int = 10, n_test: int = 6,
                       protocol: int | None = None, seed: int = 0) -> Path:
    """The python version: cifar-10-batches-py/ (5 train batches) or cifar-100-python/;
    ``protocol=None``: written as Python 2's cPickle wrote the official files."""
    from pipeline.datasets.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES

    c100 = name == "cifar100"
    folder = Path(root) / ("cifar-100-python" if c100 else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)
    k = 100 if c100 else 10
    tr_x, tr_y = cifar_arrays(n_train, k, seed)
    te_x, te_y = cifar_arrays(n_test, k, seed + 1)

    def batch(x, y, label):
        d = {"batch_label": label, "data": x.reshape(len(x), -1),
             "filenames": [f"img_{i}.png" for i in range(len(x))]}
        if c100:
            d.update(fine_labels=[int(v) for v in y], coarse_labels=[int(v) // 5 for v in y])
        else:
            d["labels"] = [int(v) for v in y]
        return d

    def dump(obj, file):
        if protocol is None:
            (folder / file).write_bytes(python2_pickle(obj))
        else:
            with open(folder / file, "wb") as f:
                pickle.dump(obj, f, protocol=protocol)

    if c100:
        dump(batch(tr_x, tr_y, "training batch 1 of 1"), "train")
        dump(batch(te_x, te_y, "testing batch 1 of 1"), "test")
        dump({"fine_label_names": list(CIFAR100_CLASSES),
              "coarse_label_names": [f"c{i}" for i in range(20)]}, "meta")
    else:
        parts = np.array_split(np.arange(n_train), 5)
        for i, idx in enumerate(parts, start=1):
            dump(batch(tr_x[idx], tr_y[idx], f"training batch {i} of 5"), f"data_batch_{i}")
        dump(batch(te_x, te_y, "testing batch 1 of 1"), "test_batch")
        dump({"num_cases_per_batch": 10000, "label_names": list(CIFAR10_CLASSES),
              "num_vis": 3072}, "batches.meta")
    return folder


def write_cifar_binary(root: Path, name: str = "cifar10", n_train: int = 10, n_test: int = 6,
                       seed: int = 0) -> Path:
    """The binary version: cifar-10-batches-bin/*.bin or cifar-100-binary/{train,test}.bin."""
    from pipeline.datasets.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES

    c100 = name == "cifar100"
    folder = Path(root) / ("cifar-100-binary" if c100 else "cifar-10-batches-bin")
    folder.mkdir(parents=True, exist_ok=True)
    k = 100 if c100 else 10
    tr_x, tr_y = cifar_arrays(n_train, k, seed)
    te_x, te_y = cifar_arrays(n_test, k, seed + 1)

    def records(x, y):
        head = [(y // 5), y] if c100 else [y]
        return np.concatenate([np.stack(head, 1).astype(np.uint8),
                               x.reshape(len(x), -1)], axis=1).tobytes()

    if c100:
        (folder / "train.bin").write_bytes(records(tr_x, tr_y))
        (folder / "test.bin").write_bytes(records(te_x, te_y))
        (folder / "fine_label_names.txt").write_text("\n".join(CIFAR100_CLASSES) + "\n")
    else:
        for i, idx in enumerate(np.array_split(np.arange(n_train), 5), start=1):
            (folder / f"data_batch_{i}.bin").write_bytes(records(tr_x[idx], tr_y[idx]))
        (folder / "test_batch.bin").write_bytes(records(te_x, te_y))
        (folder / "batches.meta.txt").write_text("\n".join(CIFAR10_CLASSES) + "\n\n")
    return folder


def write_cifar_c(src: Path, n: int, names=("gaussian_noise", "fog"), seed: int = 0):
    """The released CIFAR-10-C layout in `src`: <name>.npy uint8 (5n, 32, 32, 3), severity
    blocks 1..5, and labels.npy (the same n uint8 labels per block). Returns (labels, arrays)."""
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    np.save(src / "labels.npy", np.tile(labels, 5))
    arrays = {}
    for name in names:
        arrays[name] = rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8)
        np.save(src / f"{name}.npy", arrays[name])
    return labels, arrays


def write_image(path: Path, size: tuple[int, int], seed: int = 0, fmt: str | None = None,
                mode: str = "RGB") -> np.ndarray:
    """A smooth random image (w, h) saved with Pillow; returns its pixels (h, w, 3)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, (max(h // 4, 1), max(w // 4, 1), 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BILINEAR).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return np.asarray(img.convert("RGB"))


def write_folder(root: Path, classes=("cat", "dog"), per_class=(3, 2), splits=("train", "val"),
                 size=(40, 30), ext=".jpg", seed=0) -> Path:
    """An ImageFolder tree root/<split>/<class>/img_<k><ext>."""
    root = Path(root)
    for s, split in enumerate(splits):
        for c, name in enumerate(classes):
            for k in range(per_class[c] if isinstance(per_class, tuple) else per_class):
                write_image(root / split / name / f"img_{k}{ext}",
                            (size[0] + 3 * k, size[1] + c), seed=seed + 100 * s + 10 * c + k)
    return root


def python2_pickle(obj: dict) -> bytes:
    """``obj`` (str keys; uint8 2-D arrays, lists of ints, str values) pickled the way
    Python 2's cPickle wrote the official CIFAR python batches (protocol 2, strings as
    SHORT_BINSTRING/BINSTRING, arrays via numpy.core.multiarray._reconstruct)."""
    import struct

    def string(s) -> bytes:
        raw = s if isinstance(s, bytes) else s.encode("latin1")
        return (b"U" + bytes([len(raw)]) if len(raw) < 256 else b"T" + struct.pack("<i", len(raw))) + raw

    def integer(i: int) -> bytes:
        return b"J" + struct.pack("<i", i)

    def value(v) -> bytes:
        if isinstance(v, np.ndarray):
            assert v.dtype == np.uint8 and v.ndim == 2
            dtype = (b"cnumpy\ndtype\n" + string("u1") + integer(0) + integer(1) + b"\x87R"
                     + b"(" + integer(3) + string("|") + b"NNN" + integer(-1) + integer(-1)
                     + integer(0) + b"tb")
            return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + integer(0)
                    + b"\x85" + string("b") + b"\x87R(" + integer(1) + integer(v.shape[0])
                    + integer(v.shape[1]) + b"\x86" + dtype + b"\x89"
                    + string(np.ascontiguousarray(v).tobytes()) + b"tb")
        if isinstance(v, list):
            return b"](" + b"".join(value(x) for x in v) + b"e" if v else b"]"
        if isinstance(v, int):
            return integer(v)
        return string(v)

    body = b"".join(string(k) + value(v) for k, v in obj.items())
    return b"\x80\x02}(" + body + b"u."
