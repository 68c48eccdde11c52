"""Image folders (``folder:PATH``) and ImageNet (ILSVRC2012), read as torchvision's ImageFolder.

Layout: ``PATH/train/<class>/*.jpg`` and ``PATH/val/<class>/...`` (or ``PATH/test/``); any
depth below a class folder, files with torchvision's image extensions (``.jpg .jpeg .png
.ppm .bmp .pgm .tif .tiff .webp``, any case); other files are ignored. The ``"test"`` split
is ``val/`` if present, else ``test/``.

- Classes: the sorted subfolder names of ``train/`` (of ``val/``/``test/`` when there is no
  ``train/``); the other split's folders must be among them. A ``val/``/``test/`` folder of
  images without class folders (a deployment stream) is an unlabelled test split: sorted
  files, labels None (not for ImageNet, whose flat ILSVRC2012 val/ must be sorted into wnid
  folders first). ImageNet's classes are the
  1000 sorted wnids shipped in ``imagenet_wnids.txt`` (readable names: :func:`class_names`),
  and a subfolder that is not one of them is an error.
- Sample ids: the index in the split's sorted (class, path) order -- torchvision's
  ``ImageFolder`` order, so ids are the same as ``ImageFolder(...).samples`` indices.
- Pixels: decoded with Pillow and converted to RGB (torchvision's ``pil_loader``), the short
  side resized to ``round(S * 256 / 224)`` (bilinear, Pillow's antialiasing filter, as
  torchvision's ``Resize`` on PIL images), then a centre crop to ``S x S`` (torchvision's
  ``CenterCrop`` rounding); ``S`` = ``image_size``, default 224, so 224 is ImageNet's
  Resize(256) + CenterCrop(224).
- Identity: ``folder:<dirname>-<first 8 hex digits of sha256(class names joined by "\\n")>``
  -- the same folder mounted anywhere gives the same name.
- Normalisation: ImageNet's mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225).

ImageNet is looked for in ``data_dir`` only if given, else ``$TTT_PIPE_DATA`` and the cache,
each as ``<root>``, ``<root>/imagenet``, ``<root>/ILSVRC2012`` or Kaggle's
``<root>/ILSVRC/Data/CLS-LOC``; it is never downloaded (its licence needs a sign-in).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np

from pipeline.datasets.base import DatasetSpec, Split, check_split, one_line, search_roots
from pipeline.errors import TTTPipeError

__all__ = ["IMG_EXTENSIONS", "DEFAULT_IMAGE_SIZE", "IMAGENET_MEAN", "IMAGENET_STD",
           "folder_spec", "imagenet_spec", "imagenet_wnids", "class_names", "folder_root",
           "split_dir", "list_samples", "split_samples", "decode_image", "load", "iterate", "split_length"]

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DEFAULT_IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SPLIT_DIRS = {"train": ("train",), "test": ("val", "test")}
_HERE = Path(__file__).parent


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ILSVRC2012 wnids, sorted (torchvision's ImageFolder class order)."""
    return tuple((_HERE / "imagenet_wnids.txt").read_text().split())


@lru_cache(maxsize=1)
def _imagenet_names() -> tuple[str, ...]:
    return tuple((_HERE / "imagenet_class_names.txt").read_text().splitlines())


def class_names(spec: DatasetSpec) -> tuple[str, ...]:
    """Readable class names: ImageNet's (e.g. "tench" for n01440764), else ``spec.classes``."""
    return _imagenet_names() if spec.name == "imagenet" else spec.classes


def _check_size(image_size: int | None) -> int:
    size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 8 <= size <= 4096:
        raise TTTPipeError(f"--image-size must be an integer in 8..4096, got {image_size!r}")
    return int(size)


def folder_spec(path: str | os.PathLike, image_size: int | None = None) -> DatasetSpec:
    """The spec of the image folder at ``path`` (lists its class folders, reads no image)."""
    size = _check_size(image_size)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise TTTPipeError(f"folder:{path} is not a folder; pass folder:PATH with PATH/train/"
                           "<class>/ and PATH/val/<class>/ (or test/)")
    dirs = [d for split in ("train", "test") if (d := split_dir(root, split, required=False))]
    if not dirs:
        raise TTTPipeError(f"{root} has no train/, val/ or test/ folder; arrange the images "
                           "as PATH/train/<class>/*.jpg and PATH/val/<class>/*.jpg")
    classes = _class_folders(dirs[0])
    if not classes:
        raise TTTPipeError(f"{dirs[0]} has no class subfolders; put each class's images in "
                           f"{dirs[0]}/<class>/")
    digest = hashlib.sha256("\n".join(classes).encode()).hexdigest()[:8]
    return DatasetSpec(name=f"folder:{root.resolve().name}-{digest}", num_classes=len(classes),
                       image_shape=(3, size, size), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                       classes=tuple(classes), suite="imagenet-c",
                       form=f"folder:{root.resolve()}")


def imagenet_spec(image_size: int | None = None) -> DatasetSpec:
    size = _check_size(image_size)
    return DatasetSpec(name="imagenet", num_classes=1000, image_shape=(3, size, size),
                       mean=IMAGENET_MEAN, std=IMAGENET_STD, classes=imagenet_wnids(),
                       suite="imagenet-c", form="imagenet")


def folder_root(spec: DatasetSpec, data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding ``train/`` and ``val/`` for ``spec`` (ImageNet: searched)."""
    if spec.name != "imagenet":
        if not spec.form.startswith("folder:"):
            raise TTTPipeError(f"{spec.name}: no folder known; build the spec with "
                               "get_dataset('folder:PATH')")
        return Path(spec.form[len("folder:"):])
    roots = search_roots(data_dir)
    for root in roots:
        for folder in (root, root / "imagenet", root / "ILSVRC2012",
                       root / "ILSVRC" / "Data" / "CLS-LOC"):
            if (folder / "train").is_dir() or (folder / "val").is_dir():
                return folder
    raise TTTPipeError(f"imagenet not found in {', '.join(str(r) for r in roots)}; download "
                       "ILSVRC2012 from https://image-net.org, arrange val/ in wnid subfolders "
                       "like train/, and pass --data-dir DIR (or set TTT_PIPE_DATA)")


def split_dir(root: Path, split: str, required: bool = True) -> Path | None:
    """``root/train`` for "train", ``root/val`` or ``root/test`` for "test"."""
    check_split(split)
    for name in _SPLIT_DIRS[split]:
        if (root / name).is_dir():
            return root / name
    if required:
        wanted = " or ".join(f"{n}/" for n in _SPLIT_DIRS[split])
        raise TTTPipeError(f"{root} has no {wanted} folder for the {split} split; add it "
                           f"(PATH/{_SPLIT_DIRS[split][0]}/<class>/*.jpg)")
    return None


def list_samples(folder: Path, classes: tuple[str, ...], *, check_imagenet: bool = False,
                 what: str = "", unlabelled_ok: bool = False,
                 ) -> tuple[list[Path], np.ndarray | None]:
    """The image files under ``folder/<class>/`` in ImageFolder order, and their labels
    (indices into ``classes``). Every class folder must hold at least one image.

    ``unlabelled_ok``: a folder without subfolders holding images directly is an unlabelled
    split -- its sorted files and labels None."""
    found = _class_folders(folder)
    if not found and unlabelled_ok:
        files = _images_under(folder)
        if files:
            log.info("%s holds %d images and no class folders: unlabelled", folder, len(files))
            return files, None
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in found if c not in index]
    if unknown:
        kind = "ImageNet wnids" if check_imagenet else f"the classes of {what or 'the dataset'}"
        raise TTTPipeError(f"{folder} has {len(unknown)} subfolder(s) that are not among "
                           f"{kind} (e.g. '{unknown[0]}'); remove them or use the matching "
                           "dataset")
    if not found:
        loose = " (images directly in it are an unlabelled test split only for folder:PATH)" \
            if check_imagenet and _images_under(folder) else ""
        raise TTTPipeError(f"{folder} has no class subfolders{loose}; put each class's images "
                           f"in {folder}/<class>/")
    paths: list[Path] = []
    labels: list[int] = []
    for name in found:
        files = _images_under(folder / name)
        if not files:
            raise TTTPipeError(f"class folder {folder / name} holds no images "
                               f"({', '.join(IMG_EXTENSIONS)}); add some or remove it")
        paths += files
        labels += [index[name]] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


def decode_image(path: Path, size: int, crop: bool = True) -> np.ndarray:
    """One image file -> uint8 (3, size, size): RGB, short side to round(size*256/224) and a
    centre crop when ``crop``; else it must already be size x size."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            img = opened.convert("RGB")  # decodes: a damaged file fails here
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError,
            Image.DecompressionBombError) as exc:
        raise TTTPipeError(f"cannot decode image {path}: {one_line(exc)}; remove or replace "
                           "the file") from None
    if crop:
        img = _resize_center_crop(img, size)
    elif img.size != (size, size):
        raise TTTPipeError(f"{path} is {img.size[0]}x{img.size[1]}, not {size}x{size}; "
                           f"pass --image-size {img.size[0]} if all images have that size")
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def _resize_center_crop(img, size: int):
    """torchvision's Resize(round(size*256/224)) + CenterCrop(size) on a PIL image."""
    from PIL import Image

    short_to = int(round(size * 256 / 224))
    w, h = img.size
    if w <= h:
        new_w, new_h = short_to, int(short_to * h / w)
    else:
        new_w, new_h = int(short_to * w / h), short_to
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BILINEAR)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def split_samples(spec: DatasetSpec, split: str, data_dir=None,
                  ) -> tuple[Path, list[Path], np.ndarray | None]:
    """(split folder, image paths in ImageFolder order, int64 labels or None) -- no image
    decoded. A folder:PATH test split of images without class folders is unlabelled."""
    folder = split_dir(folder_root(spec, data_dir), split)
    is_imagenet = spec.name == "imagenet"
    paths, labels = list_samples(folder, spec.classes, check_imagenet=is_imagenet,
                                 what=spec.name, unlabelled_ok=split == "test" and not is_imagenet)
    return folder, paths, labels


def split_length(spec: DatasetSpec, split: str, data_dir=None) -> int:
    """How many images the split holds (lists files, decodes none)."""
    return len(split_samples(spec, split, data_dir)[1])


def iterate(spec: DatasetSpec, split: str, data_dir=None, *, batch: int = 256,
            rows: slice | None = None,
            ) -> Iterator[tuple[np.ndarray, np.ndarray | None, np.ndarray]]:
    """Yield (sample_ids, labels or None, uint8 images (n, 3, S, S)) of at most ``batch`` images;
    memory stays at one batch. ``rows`` selects a slice of the split's samples."""
    _, paths, labels = split_samples(spec, split, data_dir)
    ids = np.arange(len(paths), dtype=np.int64)[rows or slice(None)]
    size = spec.image_shape[1]
    for start in range(0, len(ids), batch):
        chunk = ids[start:start + batch]
        images = np.empty((len(chunk), 3, size, size), dtype=np.uint8)
        for i, k in enumerate(chunk):
            images[i] = decode_image(paths[k], size)
        yield chunk, None if labels is None else labels[chunk], images


def load(spec: DatasetSpec, split: str, data_dir=None, download: bool | None = None) -> Split:
    """The whole split in memory (small folders; use :func:`iterate` for big ones)."""
    folder, paths, labels = split_samples(spec, split, data_dir)
    size = spec.image_shape[1]
    images = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, path in enumerate(paths):
        images[i] = decode_image(path, size)
    log.info("loaded %s %s: %d images from %s", spec.name, split, len(paths), folder)
    return Split(images=images, labels=labels, spec=spec, source=str(folder))


def _class_folders(folder: Path) -> list[str]:
    """Sorted subfolder names (torchvision's find_classes)."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def _images_under(folder: Path) -> list[Path]:
    """Image files below ``folder`` in torchvision's make_dataset order."""
    files = []
    for root, _, names in sorted(os.walk(folder, followlinks=True)):
        files += [Path(root) / n for n in sorted(names) if n.lower().endswith(IMG_EXTENSIONS)]
    return files
