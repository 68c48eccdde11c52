"""What a checkpoint says about its model: a zoo name or your own `package.module:factory`,
its kwargs and its normalisation — and the trust an import path needs before it is imported.

The manifest's `model` entry (`ModelSpec.to_manifest()`):

    {"name": "resnet26", "kwargs": {"mean": [...], "std": [...], "num_classes": 10, ...},
     "normalize": "dataset"}                                    # a zoo model: kwargs say it all
    {"name": "mypkg.nets:make_net", "kwargs": {"width": 2},    # your own: the factory's kwargs,
     "normalize": "imagenet", "mean": [...], "std": [...]}     # and the normalisation put in front

A zoo model normalises inside (its `mean`/`std` kwargs). Your own module is used as it is with
`normalize="none"` (the default: it gets pixel units in [0, 1]); any other choice wraps it in
`Normalized` (`normalize` then `net`, so its layers are named `net.<layer>`).

Trust: importing a module runs its code, so a checkpoint whose model is an import path is built
only when that module (or a package containing it) is trusted: `--trust-model MODULE[,MODULE]`
or `$TTT_PIPE_TRUSTED_MODULES` (comma list; actors inherit both, see `trusted_modules`). Naming
`--model package.module:factory` on the command line trusts it for that command. Zoo names need
nothing.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.errors import TTTPipeError
from pipeline.json_option import parse_json_object
from pipeline.models import (Normalize, build_model, default_layer, get_entry,
                             model_kwargs_for, normalize_label, resolve_normalization)

__all__ = ["TRUST_ENV", "ModelSpec", "Normalized", "is_import_path", "parse_import_path",
           "parse_model_kwargs", "parse_trusted", "trusted_modules", "check_trusted",
           "resolve_model_spec", "build_model_from_spec", "build_bare_model", "wrap_normalization",
           "check_model_name", "make_engine", "layer_for", "layer_check_model"]

TRUST_ENV = "TTT_PIPE_TRUSTED_MODULES"
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def is_import_path(name: str) -> bool:
    return ":" in str(name)


def parse_import_path(name: str) -> tuple[str, str]:
    """`package.module:factory` -> (module, attribute path); one-line error when malformed."""
    module, _, attr = str(name).partition(":")
    if not _DOTTED.match(module) or not _DOTTED.match(attr):
        raise TTTPipeError(f"bad model import path {name!r}; write package.module:factory "
                           "(a module on the Python path and a callable in it)")
    return module, attr


def check_model_name(name: str) -> None:
    """A zoo name or a well-formed import path (nothing is imported here)."""
    if is_import_path(name):
        parse_import_path(name)
    else:
        get_entry(name)


def parse_model_kwargs(value: str | dict | None) -> dict[str, Any]:
    """`--model-kwargs` JSON text (or a dict) -> a dict; one-line error otherwise."""
    return parse_json_object(value, "--model-kwargs", '{"width": 2}', show_value=True)


def parse_trusted(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """`a.b,c` or an iterable of such -> ("a.b", "c"), each a dotted module name."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else [p for v in value for p in str(v).split(",")]
    out = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        if not _DOTTED.match(item):
            raise TTTPipeError(f"bad --trust-model {item!r}; give module names, e.g. mypkg.nets")
        out.append(item)
    return tuple(dict.fromkeys(out))


def trusted_modules(extra: str | Iterable[str] | None = None) -> tuple[str, ...]:
    """The modules trusted here: `extra` (the command's --trust-model) + $TTT_PIPE_TRUSTED_MODULES."""
    return tuple(dict.fromkeys(parse_trusted(extra) + parse_trusted(os.environ.get(TRUST_ENV))))


def _covered(module: str, trusted: Iterable[str]) -> bool:
    return any(module == t or module.startswith(t + ".") for t in trusted)


def check_trusted(name: str, trusted: Iterable[str] | None = None, origin: str = "") -> None:
    """Raise (one line, how to allow it) unless import path `name`'s module is trusted."""
    module, _ = parse_import_path(name)
    if not _covered(module, trusted_modules(trusted)):
        where = f"checkpoint {origin}'s model" if origin else "model"
        raise TTTPipeError(
            f"{where} {name!r} imports module {module!r}, which runs its code; if you trust it, pass "
            f"--trust-model {module} or set {TRUST_ENV}={module}")


@dataclass(frozen=True)
class ModelSpec:
    """A model as the manifest records it (see the module doc)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    normalize: str = "dataset"
    mean: float | list[float] | None = None  # import paths only: the wrapper's statistics
    std: float | list[float] | None = None

    @property
    def is_import_path(self) -> bool:
        return is_import_path(self.name)

    def to_manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kwargs": dict(self.kwargs), "normalize": self.normalize}
        if self.is_import_path and self.mean is not None:
            out.update(mean=self.mean, std=self.std)
        return out

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> ModelSpec:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise TTTPipeError("checkpoint manifest's model entry has no name; retrain or re-import it")
        return cls(name=entry["name"], kwargs=dict(entry.get("kwargs") or {}),
                   normalize=str(entry.get("normalize", "dataset")),
                   mean=entry.get("mean"), std=entry.get("std"))


def resolve_model_spec(name: str, dataset_spec, *, normalize: Any = None,
                       model_kwargs: str | dict | None = None) -> ModelSpec:
    """The ModelSpec of `name` for `dataset_spec` (a DatasetSpec).

    Zoo: `model_kwargs_for` (normalisation `normalize`, default the model's own) updated with
    `model_kwargs` (e.g. `{"norm": "batch"}`). Import path: `model_kwargs` as they are, and the
    normalisation (default `none`) resolved to mean/std for the wrapper.
    """
    extra = parse_model_kwargs(model_kwargs)
    if is_import_path(name):
        parse_import_path(name)
        choice = "none" if normalize is None else normalize
        label = normalize_label(choice)
        if label == "none":
            return ModelSpec(name=name, kwargs=extra, normalize=label)
        mean, std = resolve_normalization(choice, dataset_spec)
        return ModelSpec(name=name, kwargs=extra, normalize=label, mean=mean, std=std)
    entry = get_entry(name)
    kwargs = model_kwargs_for(name, dataset_spec, normalize)
    clash = sorted(set(extra) & {"mean", "std"})
    if clash:
        raise TTTPipeError(f"--model-kwargs sets {', '.join(clash)}; use --normalize for the normalisation")
    kwargs.update(extra)
    return ModelSpec(name=name, kwargs=kwargs,
                     normalize=normalize_label(entry.normalize if normalize is None else normalize))


class Normalized(nn.Module):
    """Your own module behind a `Normalize`: forward(x) = net(normalize(x))."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def build_bare_model(spec: ModelSpec, trusted: Iterable[str] | None = None, origin: str = "") -> nn.Module:
    """The architecture alone: a zoo model (normalising inside), or your factory's module
    (after the trust check; no normalisation wrapper yet — the weights of your file fit it)."""
    if not spec.is_import_path:
        return build_model(spec.name, **spec.kwargs)
    check_trusted(spec.name, trusted, origin)
    module_name, attr = parse_import_path(spec.name)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise TTTPipeError(f"cannot import module {module_name!r} of model {spec.name!r} ({exc}); "
                           "install it on every node (pip install ...) or put it on PYTHONPATH") from None
    except Exception as exc:  # noqa: BLE001 -- the user's module failed while importing
        raise TTTPipeError(f"importing module {module_name!r} of model {spec.name!r} failed: "
                           f"{type(exc).__name__}: {_first_line(exc)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TTTPipeError(f"module {module_name!r} has no {attr!r}; check --model {spec.name}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TTTPipeError(f"{spec.name} is not callable; --model needs a factory or an nn.Module class")
    try:
        model = obj(**spec.kwargs)
    except Exception as exc:  # noqa: BLE001 -- the user's factory failed
        raise TTTPipeError(f"model factory {spec.name}(**{json.dumps(spec.kwargs)}) failed: "
                           f"{type(exc).__name__}: {_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise TTTPipeError(f"model factory {spec.name} returned a {type(model).__name__}, not a "
                           "torch.nn.Module; return the module itself")
    return model


def wrap_normalization(spec: ModelSpec, model: nn.Module) -> nn.Module:
    """Your own module with its normalisation in front (as it is for `none` and zoo models)."""
    if spec.is_import_path and spec.mean is not None:
        return Normalized(model, spec.mean, spec.std)
    return model


def build_model_from_spec(spec: ModelSpec | dict, trusted: Iterable[str] | None = None,
                          origin: str = "") -> nn.Module:
    """The model a ModelSpec (or a manifest's `model` entry) describes, untrained."""
    if isinstance(spec, dict):
        spec = ModelSpec.from_manifest(spec)
    return wrap_normalization(spec, build_bare_model(spec, trusted, origin))


def layer_check_model(spec: ModelSpec, trusted: Iterable[str] | None = None) -> nn.Module:
    """The model built only to look up layer names: a zoo model on the meta device (no memory,
    no init), your own for real (your factory may not support the meta device)."""
    if spec.is_import_path:
        return build_model_from_spec(spec, trusted)
    with torch.device("meta"):
        return build_model_from_spec(spec)


def layer_for(model_name: str, method: str, layer: str | None, model: nn.Module | None = None) -> str | None:
    """`layer` if given, else the zoo's default for (model, method); your own model needs one.

    Your own module behind a `Normalized` wrapper is `net`: `--layer fc2` means `net.fc2` there.
    """
    if layer:
        if isinstance(model, Normalized) and not layer.startswith("net."):
            names = dict(model.named_modules())
            if layer not in names and f"net.{layer}" in names:
                return f"net.{layer}"
        return layer
    found = default_layer(model_name, method)
    if found is None and is_import_path(model_name):
        from engines.hooks import layer_names

        names = layer_names(model) if model is not None else []
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise TTTPipeError(f"model {model_name} has no default {method} layer; pass --layer "
                           f"(one of: {shown})")
    return found


def make_engine(method: str, model: nn.Module, example: torch.Tensor, config, model_name: str = ""):
    """`engines.get_engine(method)(model, example, config)`, with a model that fails the engine's
    dry run (unknown layer, a forward that fails on this input shape, logits that are not
    (N, classes), features too small for the head) reported in one line."""
    import engines

    try:
        engine_cls = engines.get_engine(method)
    except (KeyError, ValueError) as exc:
        raise TTTPipeError(_first_line(exc)) from None
    layer = getattr(config, "layer", None) if not isinstance(config, dict) else config.get("layer")
    what = f"model {model_name or type(model).__name__}"
    try:
        return engine_cls(model, example, config)
    except (ValueError, KeyError) as exc:
        raise TTTPipeError(f"{what} with {method} at layer {layer!r}: {_first_line(exc)}") from None
    except (RuntimeError, TypeError, IndexError, AttributeError) as exc:
        raise TTTPipeError(
            f"{what} fails the {method} engine's dry run on input {tuple(example.shape)} at layer "
            f"{layer!r}: {_first_line(exc)}; check the model's input shape and --layer") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return (text.strip().splitlines() or [type(exc).__name__])[0]
