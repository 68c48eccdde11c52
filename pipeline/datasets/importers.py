"""Readers of the released corrupted benchmarks: CIFAR-10-C / CIFAR-100-C and ImageNet-C.

Two steps, so a Ray job can fan the work out: :func:`plan_import` lists the
(corruption, severity) units and each unit's row order without reading a pixel;
:func:`read_unit` reads a slice of one unit as uint8 (n, 3, H, W).

Layouts:

- ``cifar-c`` (https://zenodo.org/records/2535967, CIFAR-100-C: /records/3555552):
  ``<src>/<corruption>.npy`` uint8 (5n, H, W, 3) -- severities 1..5 stacked in blocks of n
  (n = 10,000 in the released files, the clean test split) -- and ``<src>/labels.npy`` (5n,),
  the same n labels repeated. Read with ``np.load(mmap_mode="r", allow_pickle=False)``: only
  the rows asked for are read. Sample id = the row's index in its block = the index in the
  clean test split.
- ``imagenet-c`` (https://zenodo.org/records/2235448): ``<src>/<corruption>/<severity>/<class>/
  *.JPEG``, already 224x224 -- decoded, converted to RGB, not resized or cropped (an image of
  another size is an error). Labels: the class folder's index in the dataset's class list
  (``imagenet``: the 1000 sorted wnids; ``folder:PATH``: its class folders). Sample id: the
  index in the clean ``val/`` split of the file with the same class folder and file stem
  (ImageNet-C keeps the ``ILSVRC2012_val_XXXXXXXX`` names) when the clean split is found and
  every file of the unit has a match (``id_source="clean-test"``); otherwise (no clean split,
  or a file without a namesake) the index in the unit's own sorted (class, file) order
  (``id_source="corrupted-order"``, the same as the clean index when the unit holds the whole
  val set; a warning says how many files had no namesake). The rule is per unit, never per
  file, so ids within a shard never collide.

Row order inside a unit is ``np.random.default_rng(seed).permutation(n)`` (recorded as
``shuffle_seed``: ImageNet-C's folders are sorted by class, and class-sorted batches are a
different, label-correlated protocol); ``limit`` keeps its first ``limit`` rows, a seeded
random subset. Units of the same size get the same order, so every (corruption, severity)
holds the same samples.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.datasets import folder as image_folder
from pipeline.datasets.base import DatasetSpec, one_line
from pipeline.errors import TTTPipeError

__all__ = ["LAYOUTS", "COMMON", "VALIDATION", "RELEASED", "ImportUnit", "plan_import",
           "read_unit", "parse_selection", "parse_severities"]

log = logging.getLogger(__name__)

LAYOUTS = ("cifar-c", "imagenet-c")
# the names the released files and imagecorruptions use
COMMON = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
          "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
          "elastic_transform", "pixelate", "jpeg_compression")
VALIDATION = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
RELEASED = COMMON + VALIDATION
SEVERITIES = (1, 2, 3, 4, 5)


@dataclass(frozen=True, eq=False)
class ImportUnit:
    """One (corruption, severity) of a released set, planned: which rows, in which order."""

    layout: str
    dataset: str  # the spec's identity name
    corruption: str
    severity: int
    source: str  # cifar-c: the .npy file; imagenet-c: the <corruption>/<severity> folder
    image_shape: tuple[int, int, int]  # (3, H, W)
    sample_ids: np.ndarray = field(repr=False)  # int64 (n,) in row order
    labels: np.ndarray = field(repr=False)  # int64 (n,) in row order
    rows: np.ndarray = field(repr=False)  # int64 (n,): .npy rows (cifar-c), indices into files
    files: tuple[str, ...] = field(default=(), repr=False)  # imagenet-c: relative to source
    shuffle_seed: int = 0
    id_source: str = "clean-test"  # or "corrupted-order" (see the module doc)

    def __len__(self) -> int:
        return len(self.rows)

    def part(self, rows: slice) -> ImportUnit:
        """The unit cut to ``rows`` of its row order (one shard's worth): what a worker task
        needs, small to send -- an ImageNet-C part keeps only its own file names."""
        ids, labels, where = self.sample_ids[rows], self.labels[rows], self.rows[rows]
        files = self.files
        if files:
            files = tuple(files[k] for k in where)
            where = np.arange(len(files), dtype=np.int64)
        return dataclasses.replace(self, sample_ids=ids, labels=labels, rows=where, files=files)


def parse_selection(corruptions: str | Iterable[str]) -> list[str]:
    """``"all"`` (19), ``"common"`` (15), ``"validation"`` (4) or names ``"a,b"``."""
    if isinstance(corruptions, str):
        key = corruptions.strip()
        groups = {"all": RELEASED, "common": COMMON, "validation": VALIDATION}
        if key in groups:
            return list(groups[key])
        corruptions = [c.strip() for c in key.split(",") if c.strip()]
    names = list(dict.fromkeys(corruptions))
    unknown = [c for c in names if c not in RELEASED]
    if unknown or not names:
        raise TTTPipeError(f"unknown corruption(s) {', '.join(unknown) or '(none given)'} for "
                           "the released sets; choose all, common, validation or from: "
                           f"{', '.join(RELEASED)}")
    return names


def parse_severities(severities: str | int | Iterable[int]) -> list[int]:
    if isinstance(severities, str):
        try:
            severities = [int(s) for s in severities.split(",") if s.strip()]
        except ValueError:
            severities = [-1]
    elif isinstance(severities, (int, np.integer)):
        severities = [int(severities)]
    levels = sorted(set(int(s) for s in severities))
    if not levels or any(s not in SEVERITIES for s in levels):
        raise TTTPipeError(f"severities must be among 1..5 (e.g. 1,3,5), got {severities!r}")
    return levels


def plan_import(layout: str, src: str | os.PathLike, spec: DatasetSpec,
                corruptions: str | Iterable[str] = "all",
                severities: str | Iterable[int] = SEVERITIES, limit: int | None = None,
                seed: int = 0, data_dir: str | os.PathLike | None = None) -> list[ImportUnit]:
    """The units to import, in (corruption, severity) order; reads headers and file lists,
    no pixels. ``data_dir``: where the clean split is (ImageNet-C sample ids)."""
    if layout not in LAYOUTS:
        raise TTTPipeError(f"unknown layout '{layout}'; choose from: {', '.join(LAYOUTS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer))
                              or limit < 1):
        raise TTTPipeError(f"--limit must be a positive integer, got {limit!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise TTTPipeError(f"seed must be a non-negative integer, got {seed!r}")
    if spec.image_shape[0] != 3:
        raise TTTPipeError(f"the {layout} layout holds RGB images; {spec.name} is "
                           f"{spec.image_shape[0]}-channel (use cifar10, cifar100, imagenet or "
                           "folder:PATH)")
    levels = parse_severities(severities)
    parse_selection(corruptions)  # names checked before any file is looked at
    src = Path(src).expanduser()
    if not src.is_dir():
        raise TTTPipeError(f"--src {src} is not a folder; pass the extracted {layout} folder")
    names = _selected(layout, src, corruptions)
    plan = _plan_cifar_c if layout == "cifar-c" else _plan_imagenet_c
    units = plan(src, spec, names, levels, limit, int(seed), data_dir)
    log.info("planned %d %s units from %s (%d rows each)", len(units), layout, src,
             len(units[0]) if units else 0)
    return units


def read_unit(unit: ImportUnit, rows: slice | np.ndarray | None = None,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(sample_ids int64 (n,), labels int64 (n,), uint8 images (n, 3, H, W))`` for ``rows``
    (positions in the unit's row order; all when None)."""
    pick = slice(None) if rows is None else rows
    ids, labels, where = unit.sample_ids[pick], unit.labels[pick], unit.rows[pick]
    _, h, w = unit.image_shape
    if unit.layout == "cifar-c":
        array = _open_npy(Path(unit.source), (None, h, w, 3))
        order = np.argsort(where, kind="stable")  # read rows in file order
        images = np.empty((len(where), 3, h, w), dtype=np.uint8)
        try:
            images[order] = np.asarray(array[where[order]]).transpose(0, 3, 1, 2)
        except (OSError, ValueError) as exc:
            raise TTTPipeError(f"cannot read {unit.source}: {one_line(exc)}") from None
    else:
        images = np.empty((len(where), 3, h, w), dtype=np.uint8)
        for i, k in enumerate(where):
            images[i] = image_folder.decode_image(Path(unit.source) / unit.files[k], h, crop=False)
    return ids, labels, images


def _selected(layout: str, src: Path, corruptions) -> list[str]:
    names = parse_selection(corruptions)
    present = {p.stem for p in src.glob("*.npy")} if layout == "cifar-c" else \
        {p.name for p in src.iterdir() if p.is_dir()}
    if isinstance(corruptions, str) and corruptions.strip() == "all":
        names = [n for n in names if n in present]  # "all": whatever of the 19 is there
        if not names:
            what = "<corruption>.npy files" if layout == "cifar-c" else "<corruption>/ folders"
            raise TTTPipeError(f"{src} holds no {layout} {what} ({', '.join(RELEASED[:3])}, "
                               "...); pass the extracted folder with --src")
    missing = [n for n in names if n not in present]
    if missing:
        what = f"{missing[0]}.npy" if layout == "cifar-c" else f"{missing[0]}/"
        raise TTTPipeError(f"{src} has no {what} ({len(missing)} selected corruption(s) "
                           "missing); choose --corruptions among the files there")
    return names


def _order(n: int, limit: int | None, seed: int) -> np.ndarray:
    perm = np.random.default_rng(seed).permutation(n).astype(np.int64)
    return perm if limit is None else perm[:limit]


def _open_npy(path: Path, shape: tuple) -> np.ndarray:
    """A memory map of a .npy of uint8 ``shape`` (None: any length); one-line errors."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise TTTPipeError(f"cannot read {path}: {one_line(exc)}; re-download it") from None
    want = "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"
    if array.dtype != np.uint8 or array.ndim != len(shape) or any(
            s is not None and a != s for a, s in zip(array.shape, shape)):
        raise TTTPipeError(f"{path} holds {array.dtype} {array.shape}, expected uint8 "
                           f"{want}; re-download it")
    return array


def _plan_cifar_c(src: Path, spec: DatasetSpec, names, levels, limit, seed, data_dir):
    labels_path = src / "labels.npy"
    if not labels_path.is_file():
        raise TTTPipeError(f"{src} has no labels.npy; pass the extracted CIFAR-10-C/100-C "
                           "folder with --src")
    try:
        labels = np.load(labels_path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise TTTPipeError(f"cannot read {labels_path}: {one_line(exc)}") from None
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) % 5 or not len(labels):
        raise TTTPipeError(f"{labels_path} holds {labels.dtype} {labels.shape}, expected "
                           "integers (5 x n,) (50000 in the released files)")
    n = len(labels) // 5
    blocks = labels.reshape(5, n)
    if not (blocks == blocks[0]).all():
        raise TTTPipeError(f"{labels_path} does not repeat the same {n} labels for the 5 "
                           "severities; re-download it")
    clean = blocks[0].astype(np.int64)
    if clean.min() < 0 or clean.max() >= spec.num_classes:
        raise TTTPipeError(f"{labels_path} has labels outside 0..{spec.num_classes - 1} of "
                           f"{spec.name}; pass --dataset of these files (cifar10 or cifar100)")
    _, h, w = spec.image_shape
    order = _order(n, limit, seed)
    units = []
    for name in names:
        path = src / f"{name}.npy"
        array = _open_npy(path, (5 * n, h, w, 3))
        del array
        for s in levels:
            units.append(ImportUnit(
                layout="cifar-c", dataset=spec.name, corruption=name, severity=s,
                source=str(path), image_shape=spec.image_shape, sample_ids=order,
                labels=clean[order], rows=(s - 1) * n + order, shuffle_seed=seed,
                id_source="clean-test"))
    return units


def _plan_imagenet_c(src: Path, spec: DatasetSpec, names, levels, limit, seed, data_dir):
    clean = _clean_index(spec, data_dir)
    is_imagenet = spec.name == "imagenet"
    units, shared = [], {}
    for name in names:
        for s in levels:
            folder = src / name / str(s)
            if not folder.is_dir():
                raise TTTPipeError(f"{src / name} has no severity folder {s}/; choose "
                                   "--severities among the folders there")
            paths, labels = image_folder.list_samples(folder, spec.classes,
                                                      check_imagenet=is_imagenet, what=spec.name)
            files = tuple(str(p.relative_to(folder)) for p in paths)
            files = shared.setdefault(files, files)  # one copy of equal file lists
            ids, id_source = _sample_ids(files, folder, clean)
            order = _order(len(files), limit, seed)
            units.append(ImportUnit(
                layout="imagenet-c", dataset=spec.name, corruption=name, severity=s,
                source=str(folder), image_shape=spec.image_shape, sample_ids=ids[order],
                labels=labels[order], rows=order, files=files, shuffle_seed=seed,
                id_source=id_source))
    return units


def _key(relative: str) -> tuple[str, str]:
    """(class folder, file path without extension) of a path relative to the split folder."""
    cls, _, rest = relative.partition(os.sep)
    return cls, os.path.splitext(rest)[0]


def _clean_index(spec: DatasetSpec, data_dir) -> dict[tuple[str, str], int] | None:
    """(class, stem) -> index in the clean test split, or None when it is not available."""
    try:
        folder, paths, _ = image_folder.split_samples(spec, "test", data_dir)
    except TTTPipeError as exc:
        log.warning("clean %s test split not available (%s); ImageNet-C sample ids are the "
                    "index in each corrupted folder's sorted order", spec.name, exc)
        return None
    return {_key(str(p.relative_to(folder))): i for i, p in enumerate(paths)}


def _sample_ids(files: tuple[str, ...], folder: Path, clean) -> tuple[np.ndarray, str]:
    if clean is None:
        return np.arange(len(files), dtype=np.int64), "corrupted-order"
    ids = np.fromiter((clean.get(_key(f), -1) for f in files), dtype=np.int64, count=len(files))
    if (ids >= 0).all():
        return ids, "clean-test"
    first = files[int(np.argmin(ids >= 0))]
    log.warning("%s: %d of %d files have no namesake in the clean test split (e.g. %s); its "
                "sample ids are the index in its own sorted order", folder, (ids < 0).sum(),
                len(files), first)
    return np.arange(len(files), dtype=np.int64), "corrupted-order"
