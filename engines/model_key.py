"""What a traced graph of a model depends on besides tensor values (torch.fx bakes Python
attributes into the graph as constants): a key to tell when a model's split is out of date,
and to tell whether a forward changes the model's own state."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["graph_key", "same_key"]

_PLAIN = (bool, int, float, complex, str, bytes, type(None))


_INTERNAL = frozenset(vars(nn.Module()))  # what every module has: parameters, hooks, training
_MAX_ITEMS = 256                          # longer containers: compared by identity and length


def _freeze(value, objects: list, depth: int = 0):
    """A value for == comparison: plain values as they are, containers element-wise, plain
    objects (a config dataclass, a SimpleNamespace) by their attributes, and anything else
    (tensors, functions, modules) as a slot whose object is compared by identity."""
    if isinstance(value, _PLAIN):
        return value
    deep = depth < 4
    if isinstance(value, (list, tuple, set, frozenset, dict)) and deep and len(value) <= _MAX_ITEMS:
        if isinstance(value, dict):
            return ("dict", tuple((k, _freeze(v, objects, depth + 1)) for k, v in value.items()))
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return (type(value).__name__, tuple(_freeze(v, objects, depth + 1) for v in items))
    objects.append(value)
    if (deep and hasattr(value, "__dict__") and not callable(value)
            and not isinstance(value, (nn.Module, torch.Tensor))):
        return ("object", len(objects), _freeze(dict(vars(value)), objects, depth + 1))
    return ("object", len(objects), len(value) if isinstance(value, (list, dict)) else None)


def graph_key(model: nn.Module) -> tuple[list, list, list]:
    """(structure, attribute objects, attribute values) that a traced graph of `model` depends
    on besides tensor values: module objects and types, parameter/buffer objects and hooks
    (compared by identity), and every other attribute, private ones included (torch.fx bakes
    the ones it reads into the graph; objects by identity, plain values by ==). torch's global
    module hooks are left out: profilers and FlopCounterMode add them to watch."""
    structure: list = []
    objects: list = []
    values: list = []
    for name, m in model.named_modules():
        structure += [m, type(m), *m._parameters.values(), *m._buffers.values(),
                      *m._forward_hooks.values(), *m._forward_pre_hooks.values(),
                      *m._backward_hooks.values(), *m._backward_pre_hooks.values()]
        values.append((name, tuple((k, _freeze(v, objects)) for k, v in vars(m).items()
                                   if k not in _INTERNAL)))
    return structure, objects, values


def same_key(a: tuple, b: tuple, structure_only: bool = False) -> bool:
    """Whether two `graph_key`s are the same (only their structure part: `structure_only`)."""
    parts = (0,) if structure_only else (0, 1)
    return all(len(a[i]) == len(b[i]) and all(p is q for p, q in zip(a[i], b[i]))
               for i in parts) and (structure_only or a[2] == b[2])
