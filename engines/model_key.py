"""What a traced graph of a model depends on besides tensor values (torch.fx bakes Python
attributes into the graph as constants): a key to tell when a model's split is out of date,
and to tell whether a forward changes the model's own state."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["changes_in_forward", "graph_key", "model_state", "same_key"]

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


def graph_key(model: nn.Module, skip: frozenset = frozenset()) -> tuple[list, list, list]:
    """(structure, attribute objects, attribute values) that a traced graph of `model` depends
    on besides tensor values: module objects and types, parameter/buffer objects and hooks
    (compared by identity) and their shapes and dtypes, every other attribute, private ones
    included, and the plain class attributes of each module's class (torch.fx bakes the ones
    it reads into the graph; objects by identity, plain values by ==). `skip`: names of modules whose attributes are left out
    (and those of their submodules; their structure stays in): modules a graph calls as a
    whole, whose own Python state the graph does not bake in. torch's global module hooks are
    left out: profilers and FlopCounterMode add them to watch."""
    structure: list = []
    objects: list = []
    values: list = []
    classes: dict[type, None] = {}
    for name, m in model.named_modules():
        structure += [m, type(m), *m._parameters.values(), *m._buffers.values(),
                      *m._forward_hooks.values(), *m._forward_pre_hooks.values(),
                      *m._backward_hooks.values(), *m._backward_pre_hooks.values()]
        # a tensor given new data of another shape or dtype stays the same object (`.data =`)
        values.append((name, tuple((k, tuple(t.shape), t.dtype) for k, t in
                                   [*m._parameters.items(), *m._buffers.items()]
                                   if t is not None)))
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        values.append((name, tuple((k, _freeze(v, objects)) for k, v in vars(m).items()
                                   if k not in _INTERNAL)))
        classes[type(m)] = None
    for cls in classes:  # e.g. a counter kept on the class: type(self).seen += 1
        values.append((cls.__qualname__, tuple(
            (k, _freeze(v, objects)) for k, v in vars(cls).items()
            if not k.startswith("__") and not callable(v)
            and not isinstance(v, (property, staticmethod, classmethod)))))
    return structure, objects, values


def same_key(a: tuple, b: tuple, structure_only: bool = False) -> bool:
    """Whether two `graph_key`s are the same (only their structure part: `structure_only`)."""
    parts = (0,) if structure_only else (0, 1)
    return all(len(a[i]) == len(b[i]) and all(p is q for p, q in zip(a[i], b[i]))
               for i in parts) and (structure_only or a[2] == b[2])


def model_state(model: nn.Module, skip: frozenset = frozenset()) -> tuple:
    """The model's whole state for an equality check: its graph key (values as text, so NaN
    equals NaN) and the version counters of its tensors (in-place updates bump them)."""
    key = graph_key(model, skip)
    tensors = [t for t in (*key[0], *key[1]) if isinstance(t, torch.Tensor)]
    return (tuple(map(id, key[0])), tuple(map(id, key[1])), repr(key[2]),
            tuple(t._version for t in tensors))


def changes_in_forward(model: nn.Module, x: torch.Tensor, skip: frozenset) -> bool:
    """Whether a forward changes the model's Python state or a tensor in place (a counter, a
    cache of features, a list it appends to): a traced graph would not replay it. `skip`:
    modules a graph calls as a whole (their own attributes are theirs to change)."""
    before = model_state(model, skip)
    with torch.no_grad():
        model(x)
    return model_state(model, skip) != before
