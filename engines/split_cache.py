"""One `LayerSplit` per engine, kept up to date: rebuilt when the model changes in a way its
traced graph would not see (new modules, tensors or hooks; changed public attributes, which
torch.fx bakes into the graph as constants), unused while any module is in train mode."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engines.split import LayerSplit

__all__ = ["SplitSlot"]


class SplitSlot:
    """An engine's `LayerSplit`, kept out of the module tree (not in `state_dict()`), out of
    pickles and deep copies (rebuilt on first use), and rebuilt when anything a traced graph
    depends on besides tensor values changed: the modules, the parameter/buffer objects (e.g.
    `model.to(device)` swaps buffers), the hooks, plain Python attributes (torch.fx bakes them
    into the graph as constants). None while any model module is in train mode: dropout and
    batch-norm statistics must see every pass and row, as in whole forwards."""

    def __init__(self, channel_delta: bool = False) -> None:
        self.channel_delta = channel_delta
        self._split: LayerSplit | None = None
        self._key: tuple[list, list, list] = ([], [], [])
        self._call: object = None          # the adapt() call the answer below was given for
        self._answer: LayerSplit | None = None

    def __getstate__(self) -> dict:
        return {"channel_delta": self.channel_delta}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def get(self, model: nn.Module, layer: str, x: torch.Tensor, call: object = None,
            rows_check: Callable[[], tuple[torch.Tensor, int]] | None = None
            ) -> LayerSplit | None:
        """The split for `model` at `layer` (built on first use from x's first rows); None when
        it cannot be used. `call`: an id of the current adapt() call — the model cannot change
        within one, so the checks run once per call. `rows_check()` -> (X, n): see
        `LayerSplit.build`."""
        if call is not None and call == self._call:
            return self._answer
        self._call, self._answer = call, None
        if any(m.training for m in model.modules()):
            return None
        key = _graph_key(model)
        # after a refusal only new modules, tensors or hooks are worth a new try (a model that
        # sets attributes in forward would otherwise be re-traced, and warn, at every call)
        refused = self._split is None and bool(self._key[0])
        stale = not _same_key(key, self._key, structure_only=refused)
        if stale:
            self._key = key
            self._split = LayerSplit.build(
                model, layer, x[:4].detach(), channel_delta=self.channel_delta,
                rows_check=rows_check() if rows_check is not None else None)
        self._answer = self._split
        return self._split


_PLAIN = (bool, int, float, complex, str, bytes, type(None))


def _freeze(value, objects: list):
    """A value for == comparison: plain values as they are, lists/tuples/dicts element-wise,
    anything else (tensors, functions, modules) as a slot whose object is compared by identity."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_freeze(v, objects) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _freeze(v, objects)) for k, v in value.items()))
    objects.append(value)
    return ("object", len(objects))


def _graph_key(model: nn.Module) -> tuple[list, list, list]:
    """(structure, attribute objects, attribute values) that a traced graph of `model` depends
    on besides tensor values: module objects and types, parameter/buffer objects and hooks
    (compared by identity), and every public attribute (torch.fx bakes the ones it reads into
    the graph; objects by identity, plain values by ==). torch's global module hooks are left
    out: profilers and FlopCounterMode add them to watch."""
    structure: list = []
    objects: list = []
    values: list = []
    for name, m in model.named_modules():
        structure += [m, type(m), *m._parameters.values(), *m._buffers.values(),
                      *m._forward_hooks.values(), *m._forward_pre_hooks.values(),
                      *m._backward_hooks.values(), *m._backward_pre_hooks.values()]
        values.append((name, tuple((k, _freeze(v, objects)) for k, v in vars(m).items()
                                   if k != "training" and not k.startswith("_"))))
    return structure, objects, values


def _same_key(a: tuple, b: tuple, structure_only: bool = False) -> bool:
    parts = (0,) if structure_only else (0, 1)
    return all(len(a[i]) == len(b[i]) and all(p is q for p, q in zip(a[i], b[i]))
               for i in parts) and (structure_only or a[2] == b[2])
