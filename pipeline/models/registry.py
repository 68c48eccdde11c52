"""The zoo's registry: one `ZooEntry` per model name (factory, normalisation, default layers)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from pipeline.errors import TTTPipeError

__all__ = ["ZooEntry", "register_model", "get_entry", "list_models", "build_model", "default_layer"]


@dataclass(frozen=True)
class ZooEntry:
    """What the pipeline knows about a zoo model besides its factory.

    `normalize`: the default normalisation (`dataset`, `none`, `imagenet`) — what its weights
    usually expect. `shape_kwargs`: which of `in_channels` / `image_size` the factory takes
    (the others' input shape is fixed by the architecture: 3 channels, any size the pooling
    allows). `layers`: the layer each engine attaches to when the user gives no `--layer`.
    `inputs`: the input the architecture is made for, in words (docs and errors).
    """

    name: str
    factory: Callable[..., nn.Module]
    normalize: str = "dataset"
    shape_kwargs: tuple[str, ...] = ()
    layers: dict[str, str] = field(default_factory=dict)
    inputs: str = ""


_MODELS: dict[str, ZooEntry] = {}


def register_model(name: str, *, normalize: str = "dataset", shape_kwargs: tuple[str, ...] = (),
                   layers: dict[str, str] | None = None, inputs: str = ""):
    """Class/function decorator adding a zoo model under `name`."""

    def deco(factory):
        _MODELS[name] = ZooEntry(name=name, factory=factory, normalize=normalize,
                                 shape_kwargs=tuple(shape_kwargs), layers=dict(layers or {}),
                                 inputs=inputs)
        return factory

    return deco


def list_models() -> list[str]:
    return sorted(_MODELS)


def get_entry(name: str) -> ZooEntry:
    try:
        return _MODELS[name]
    except KeyError:
        raise TTTPipeError(
            f"unknown model {name!r}; choose from: {', '.join(list_models())} "
            "(or package.module:factory for your own)") from None


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a zoo model by name, e.g. `build_model("seed_cnn", mean=0.286, std=0.353)`."""
    entry = get_entry(name)
    try:
        return entry.factory(**kwargs)
    except TypeError as exc:  # an unknown keyword: name the model and the problem
        raise TTTPipeError(f"model {name!r}: {str(exc).splitlines()[0]}") from None


def default_layer(model: str, method: str) -> str | None:
    """The layer `method`'s engine attaches to on zoo model `model` (None: the engine's own default)."""
    entry = _MODELS.get(model)
    return None if entry is None else entry.layers.get(method)
