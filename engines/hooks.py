"""Reaching into a model by layer name: find it once, tap its output, add to its output.

Hooks live only inside a `with` block (removed in `finally`), so the caller's model carries
no hook between engine calls and stays picklable/deep-copyable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "DryRun",
    "add_delta",
    "add_to_output",
    "build_seeded",
    "capture_output",
    "dry_run",
    "find_module",
    "has_forward_hooks",
    "layer_names",
]


def layer_names(model: nn.Module) -> list[str]:
    """The names a layer can be chosen by (every named submodule but the root)."""
    return [name for name, _ in model.named_modules() if name]


def find_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called `name`; a one-line ValueError naming the valid names otherwise."""
    modules = dict(model.named_modules())
    if not name or name not in modules:
        raise ValueError(
            f"unknown layer {name!r} in {type(model).__name__}; "
            f"choose from: {', '.join(layer_names(model))}")
    return modules[name]


class _Store:
    """What a capture hook saw: `.output` of the last forward."""

    output: torch.Tensor | None = None


@contextmanager
def capture_output(module: nn.Module) -> Iterator[_Store]:
    """`with capture_output(layer) as store: model(x)` leaves the layer's output in store.output."""
    store = _Store()

    def hook(_module, _inputs, output):
        store.output = output

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def has_forward_hooks(module: nn.Module) -> bool:
    """Forward or forward-pre hooks on the module itself."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def add_delta(h: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    """h + delta, a (B, C) delta broadcast over h's trailing (spatial) dims: (B, C, 1, 1) for a
    (B, C, H, W) h; None adds nothing."""
    if delta is None:
        return h
    if delta.dim() < h.dim():
        delta = delta.reshape(*delta.shape, *([1] * (h.dim() - delta.dim())))
    return h + delta


@contextmanager
def add_to_output(module: nn.Module, delta: torch.Tensor) -> Iterator[None]:
    """Inside the block the module returns `output + delta`.

    `delta` is (B, C) for a per-channel shift of a (B, C, ...) output, or the output's shape.
    """
    def hook(_module, _inputs, output):
        return add_delta(output, delta)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@dataclass(frozen=True)
class DryRun:
    """One forward of the example input: the layer's features, the logits, and the module
    names in the order they first ran (to tell the encoder, run up to the layer, from the rest)."""

    features: torch.Tensor
    logits: torch.Tensor
    order: list[str]


def dry_run(model: nn.Module, example_input: torch.Tensor, layer: str) -> DryRun:
    """Run `model(example_input)` once, in eval mode and without grad, restoring every
    submodule's train/eval flag afterwards (so BatchNorm statistics are not touched).
    An empty `layer` (a method without one): the features are the logits."""
    target = find_module(model, layer) if layer else None
    names = {module: name for name, module in model.named_modules()}
    order: list[str] = []
    handles = []

    def record(module, _inputs, _output):
        name = names.get(module)
        if name and name not in order:
            order.append(name)

    flags = {module: module.training for module in model.modules()}
    try:
        for module in model.modules():
            handles.append(module.register_forward_hook(record))
        model.eval()
        with torch.no_grad(), capture_output(target or model) as store:
            logits = model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags.items():
            module.training = flag
    if not isinstance(store.output, torch.Tensor):
        raise ValueError(f"layer {layer!r} did not run or does not return a tensor; "
                         f"choose a layer on the forward path: {', '.join(order)}")
    if logits.dim() != 2:
        raise ValueError(f"the model must return logits (B, C), got shape {tuple(logits.shape)}")
    return DryRun(features=store.output, logits=logits, order=order)


def _seeded_reset(module: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default init for Linear/Conv (kaiming-uniform, a=sqrt(5)), drawn from `generator`."""
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
        if module.bias is not None:
            bound = 1.0 / math.sqrt(module.weight[0].numel())
            nn.init.uniform_(module.bias, -bound, bound, generator=generator)
    elif any(True for _ in module.parameters(recurse=False)):
        raise ValueError(f"cannot seed-initialise a {type(module).__name__}; use Linear/Conv")


def build_seeded(factory: Callable[[], nn.Module], generator: torch.Generator,
                 device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Build `factory()` with weights drawn from `generator` (on CPU, so CPU and CUDA get the
    same numbers) without consuming the global RNG, then move it to `device`/`dtype`."""
    with torch.device("meta"):
        module = factory()
    module = module.to_empty(device="cpu")
    for sub in module.modules():
        _seeded_reset(sub, generator)
    return module.to(device=device, dtype=dtype)
