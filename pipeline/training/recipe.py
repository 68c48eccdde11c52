"""How a run trains: optimizer, learning-rate schedule, augmentation, precision, validation share.

The seed nets' recipe (Adam at the method's `train_lr`, no schedule, no augmentation, fp32,
every train sample trains) is the default on MNIST-like data, so their training is bit-identical
to the seed tutorials'. RGB data defaults to its augmentation and a 10% validation share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.errors import TTTPipeError

__all__ = ["OPTIMIZERS", "SCHEDULES", "PRECISIONS", "TrainRecipe", "resolve_recipe", "build_optimizer",
           "build_scheduler", "autocast_dtype"]

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("none", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")
SGD_DEFAULTS = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine"}
_GRAY = ("mnist", "fashion-mnist")  # the seeds' data: their protocol stays the default


@dataclass(frozen=True, kw_only=True)
class TrainRecipe:
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0        # sgd only
    schedule: str = "none"       # per batch: cosine from lr to 0 over all the run's batches
    augment: str = "none"        # none | cifar | imagenet (auto resolved)
    precision: str = "fp32"
    val_fraction: float = 0.0

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _number(value, flag: str, low: float, high: float | None = None, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (value <= low if low_open else value < low) or (high is not None and value >= high):
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        bound += "" if high is None else f" and < {high:g}"
        raise TTTPipeError(f"{flag} must be a number {bound}, got {value!r}")
    return float(value)


def _choice(value: str, flag: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise TTTPipeError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
    return value


def resolve_recipe(dataset: str, *, method_lr: float, optimizer: str | None = None,
                   lr: float | None = None, weight_decay: float | None = None,
                   momentum: float | None = None, schedule: str | None = None,
                   augment: str | None = None, precision: str | None = None,
                   val_fraction: float | None = None, image_shape: tuple[int, ...] | None = None
                   ) -> TrainRecipe:
    """Fill in the defaults (by optimizer and dataset) and check every value (one-line errors).

    `dataset` is the DatasetSpec name; `augment="auto"` (or None) means none on MNIST-like data,
    cifar on 32x32 RGB, imagenet on other RGB data.
    """
    optimizer = _choice(optimizer or "adam", "--optimizer", OPTIMIZERS)
    sgd = optimizer == "sgd"
    if momentum is not None and not sgd:
        raise TTTPipeError("--momentum applies to --optimizer sgd only; drop it or pass --optimizer sgd")
    lr = _number(lr if lr is not None else (SGD_DEFAULTS["lr"] if sgd else method_lr), "--lr", 0, low_open=True)
    wd = _number(weight_decay if weight_decay is not None else (SGD_DEFAULTS["weight_decay"] if sgd else 0.0),
                 "--weight-decay", 0)
    mom = _number(momentum if momentum is not None else (SGD_DEFAULTS["momentum"] if sgd else 0.0),
                  "--momentum", 0, 1)
    schedule = _choice(schedule or (SGD_DEFAULTS["schedule"] if sgd else "none"), "--schedule", SCHEDULES)
    gray = dataset in _GRAY or (image_shape is not None and image_shape[0] == 1)
    augment = augment or "auto"
    if augment == "auto":
        if gray:
            augment = "none"
        else:
            augment = "cifar" if image_shape is not None and tuple(image_shape[1:]) == (32, 32) else "imagenet"
    from pipeline.training.augment import AUGMENTS

    augment = _choice(augment, "--augment", AUGMENTS)
    precision = _choice(precision or "fp32", "--precision", PRECISIONS)
    vf = _number(val_fraction if val_fraction is not None else (0.0 if gray else 0.1),
                 "--val-fraction", 0, 1)
    return TrainRecipe(optimizer=optimizer, lr=lr, weight_decay=wd, momentum=mom, schedule=schedule,
                       augment=augment, precision=precision, val_fraction=vf)


def build_optimizer(params, recipe: TrainRecipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                               weight_decay=recipe.weight_decay, nesterov=False)
    if recipe.weight_decay:  # the seeds' Adam has none; with some, decoupled (AdamW) is what works
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.Adam(params, lr=recipe.lr)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: TrainRecipe, total_steps: int):
    """None (constant lr) or a per-batch cosine decay to 0 over `total_steps` batches."""
    if recipe.schedule == "none":
        return None
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
