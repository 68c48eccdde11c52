"""Normalisation choices and the kwargs a zoo model needs for a dataset (`model_kwargs_for`).

A model's normalisation is part of its spec, stored in the checkpoint manifest:
`none` (the model takes [0, 1] pixels as they are, e.g. RobustBench's models), `dataset` (the
dataset's per-channel mean/std), `imagenet` (torchvision's ImageNet statistics) or given
values `MEAN,STD` (two numbers, one for every channel) / `[m1,m2,m3],[s1,s2,s3]`.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.errors import TTTPipeError
from pipeline.models.normalize import as_stats
from pipeline.models.registry import get_entry

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "NORMALIZE_CHOICES", "parse_normalize",
           "resolve_normalization", "model_kwargs_for", "normalize_label"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZE_CHOICES = ("none", "dataset", "imagenet")
_HINT = "use none, dataset, imagenet, MEAN,STD or [m1,m2,m3],[s1,s2,s3]"


def parse_normalize(value: Any) -> str | tuple[Any, Any]:
    """A `--normalize` value: one of NORMALIZE_CHOICES, or (mean, std) (numbers or lists)."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return (value[0], value[1])
    text = str(value).strip()
    if text.lower() in NORMALIZE_CHOICES:
        return text.lower()
    try:
        parsed = json.loads(f"[{text}]")
    except json.JSONDecodeError:
        raise TTTPipeError(f"bad --normalize {text!r}; {_HINT}") from None
    if len(parsed) != 2:
        raise TTTPipeError(f"bad --normalize {text!r}: it needs a mean and a std; {_HINT}")
    as_stats(parsed[0], "mean"), as_stats(parsed[1], "std")  # numbers, or a one-line error
    return (parsed[0], parsed[1])


def normalize_label(value: Any) -> str:
    """The manifest's record of the choice: the name, or "MEAN,STD" as JSON text."""
    choice = parse_normalize(value)
    return choice if isinstance(choice, str) else json.dumps(list(choice), separators=(",", ":"))[1:-1]


def _plain(values: tuple[float, ...]) -> float | list[float]:
    return values[0] if len(values) == 1 else list(values)


def resolve_normalization(normalize: Any, spec) -> tuple[float | list[float], float | list[float]]:
    """(mean, std) for `spec`'s images: a float when one value, else one per channel (a list).

    `spec` is a DatasetSpec (per-channel tuples or, in older specs, floats); a per-channel
    choice whose length is not the data's channel count is a one-line error.
    """
    choice = parse_normalize(normalize)
    channels = int(spec.image_shape[0])
    if choice == "none":
        return 0.0, 1.0
    if choice == "dataset":
        mean, std = spec.mean, spec.std
    elif choice == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = choice
    mean_t, std_t = as_stats(mean, "mean"), as_stats(std, "std")
    if not all(s > 0 for s in std_t):
        raise TTTPipeError(f"normalisation std must be > 0, got {std!r}")
    for values, what in ((mean_t, "mean"), (std_t, "std")):
        if len(values) not in (1, channels):
            raise TTTPipeError(
                f"--normalize {normalize_label(normalize)}: {len(values)} {what} values for "
                f"{channels}-channel images of {spec.name}; give {'1' if channels == 1 else f'1 or {channels}'}")
    return _plain(mean_t), _plain(std_t)


def model_kwargs_for(name: str, spec, normalize: Any = None) -> dict[str, Any]:
    """The kwargs zoo model `name` needs for dataset `spec` (a DatasetSpec), JSON-serialisable.

    `normalize` None takes the model's default (`dataset` for the seed nets and resnet26,
    `none` for wrn28_10, `imagenet` for the torchvision ResNets). Always `mean`, `std`,
    `num_classes`; `in_channels` / `image_size` ([H, W]) where the architecture takes them.
    A model made for 3 channels on other data -> one-line error.
    """
    entry = get_entry(name)
    channels, height, width = (int(v) for v in spec.image_shape)
    if "in_channels" not in entry.shape_kwargs and channels != 3:
        raise TTTPipeError(f"model {name!r} takes RGB images ({entry.inputs}); {spec.name} has "
                           f"{channels} channel(s): use seed_cnn, seed_rescnn or seed_cnn_bn")
    mean, std = resolve_normalization(entry.normalize if normalize is None else normalize, spec)
    kwargs: dict[str, Any] = {"mean": mean, "std": std, "num_classes": int(spec.num_classes)}
    if "in_channels" in entry.shape_kwargs:
        kwargs["in_channels"] = channels
    if "image_size" in entry.shape_kwargs:
        kwargs["image_size"] = [height, width]
    return kwargs
