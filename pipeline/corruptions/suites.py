"""The two corruption suites and one dispatcher: the data's channel count picks the suite.

    from pipeline.corruptions.suites import corrupt_batch, parse_corruptions, suite_for
    suite = suite_for(spec.image_shape)                 # "mnist-c" (C == 1) or "imagenet-c" (C == 3)
    names = parse_corruptions("common", suite)
    y = corrupt_batch(images_uint8, names[0], 3, ids, seed, suite=suite, std=spec.std)

Several names (fog, motion_blur, brightness, ...) exist in both suites with different
algorithms, which is why the suite is recorded wherever a corruption name is.
- mnist-c: `pipeline.corruptions.corrupt` on `uint8 / 255` (float32), bit-identical to
  `corrupt(to_float(x), ...)`; output float32 pixel units (the seeds' noise is unclipped).
- imagenet-c: `pipeline.corruptions.imagenet_c.corrupt`, uint8 in and out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from pipeline.corruptions import imagenet_c
from pipeline.corruptions.core import corrupt as _corrupt_mnist_c
from pipeline.corruptions.core import list_corruptions as _mnist_c_names
from pipeline.corruptions.core import list_validation_corruptions as _mnist_c_validation
from pipeline.errors import TTTPipeError

__all__ = ["SUITES", "suite_for", "suite_names", "parse_corruptions", "corrupt_batch",
           "output_dtype"]

SUITES: tuple[str, ...] = ("mnist-c", "imagenet-c")
_SELECTIONS = ("all", "common", "validation")


def suite_for(image_shape: Sequence[int]) -> str:
    """(C, H, W) -> "mnist-c" for one channel, "imagenet-c" for three."""
    channels = int(image_shape[0])
    if channels == 1:
        return "mnist-c"
    if channels == 3:
        return "imagenet-c"
    raise TTTPipeError(f"no corruption suite for {channels}-channel images {tuple(image_shape)}; "
                       "corruptions need 1 (grayscale) or 3 (RGB) channels")


def _check_suite(suite: str) -> str:
    if suite not in SUITES:
        raise TTTPipeError(f"unknown corruption suite {suite!r}; choose from: {', '.join(SUITES)}")
    return suite


def suite_names(suite: str) -> list[str]:
    """Every corruption of `suite` except identity (mnist-c: sorted, its validation corruptions
    last; imagenet-c: its 19 in order)."""
    if _check_suite(suite) == "mnist-c":
        return _mnist_c_names() + _mnist_c_validation()
    return list(imagenet_c.ALL)


def _resolve(name: str, suite: str) -> list[str]:
    if suite == "mnist-c":
        if name == "all":
            return _mnist_c_names()
        if name == "validation":
            return _mnist_c_validation()
        if name == "common":
            raise TTTPipeError("'common' is an imagenet-c (RGB) selection; this data uses the mnist-c "
                               "suite: pass 'all', 'validation' or names like 'gaussian_noise,fog'")
        if name == "identity" or name in suite_names("mnist-c"):
            return [name]
        if name in imagenet_c.ALL:
            raise TTTPipeError(f"{name!r} is an imagenet-c corruption that needs RGB images; this data is "
                               f"grayscale (mnist-c suite): choose from {', '.join(_mnist_c_names())}")
        raise TTTPipeError(f"unknown corruption {name!r}; the mnist-c suite has: "
                           f"{', '.join(_mnist_c_names())} (or 'all'); for tuning: "
                           f"{', '.join(_mnist_c_validation())} (or 'validation')")
    selection = {"all": imagenet_c.ALL, "common": imagenet_c.COMMON,
                 "validation": imagenet_c.VALIDATION}
    if name in selection:
        return list(selection[name])
    if name == "identity" or name in imagenet_c.ALL:
        return [name]
    if name in suite_names("mnist-c"):
        raise TTTPipeError(f"{name!r} is an mnist-c (grayscale) corruption; this data is RGB (imagenet-c "
                           f"suite): choose from {', '.join(imagenet_c.ALL)} (or all/common/validation)")
    raise TTTPipeError(f"unknown corruption {name!r}; the imagenet-c suite has: {', '.join(imagenet_c.ALL)} "
                       "(or all/common/validation)")


def parse_corruptions(spec: str | Iterable[str], suite: str) -> list[str]:
    """"all" | "common" | "validation" | "a,b" -> validated names of `suite`, de-duplicated, in order."""
    _check_suite(suite)
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s) for s in spec]
    names = [n for n in names if n]
    if not names:
        raise TTTPipeError("no corruption given; pass names like 'gaussian_noise,fog' or 'all'")
    out: list[str] = []
    for name in names:
        out.extend(c for c in _resolve(name, suite) if c not in out)
    return out


def output_dtype(suite: str) -> np.dtype:
    """float32 for mnist-c (pixel units, possibly unclipped), uint8 for imagenet-c."""
    return np.dtype(np.float32) if _check_suite(suite) == "mnist-c" else np.dtype(np.uint8)


def _single_std(std) -> float:
    values = np.atleast_1d(np.asarray(std, dtype=np.float64))
    if values.size != 1:
        raise TTTPipeError(f"the mnist-c suite needs one normalisation std (grayscale), got {tuple(values)}")
    return float(values[0])


def corrupt_batch(images: np.ndarray, name: str, severity: int, sample_ids, seed: int, *,
                  suite: str, std=None) -> np.ndarray:
    """uint8 images (N, C, H, W) -> the suite's output dtype (see `output_dtype`), same shape.

    `std` is the dataset's normalisation std (mnist-c's gaussian_noise is in normalised units);
    imagenet-c ignores it. `identity` returns the clean images.
    """
    _check_suite(suite)
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise TTTPipeError(f"corrupt_batch needs uint8 images, got dtype {x.dtype}; pass the split's pixels")
    if x.ndim != 4:
        raise TTTPipeError(f"corrupt_batch needs images shaped (N, C, H, W), got {x.shape}")
    if suite_for(x.shape[1:]) != suite:
        raise TTTPipeError(f"{x.shape[1]}-channel images belong to the {suite_for(x.shape[1:])} suite, "
                           f"not {suite}; pick the suite with suite_for(image_shape)")
    if name in _SELECTIONS:
        raise TTTPipeError(f"corrupt_batch takes one corruption name, got the selection {name!r}; "
                           "expand it with parse_corruptions(spec, suite)")
    _resolve(name, suite)  # one-line error for a name of the other suite
    if suite == "mnist-c":
        if std is None:
            raise TTTPipeError("the mnist-c suite needs std= (the dataset's normalisation std)")
        # Exactly pipeline.datasets.to_float: uint8 / 255 in float32.
        pixels = x.astype(np.float32) / np.float32(255.0)
        return _corrupt_mnist_c(pixels, name, severity, sample_ids, seed, _single_std(std))
    return imagenet_c.corrupt(x, name, severity, sample_ids, seed)
