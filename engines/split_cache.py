"""One `LayerSplit` per engine, kept up to date: rebuilt when the model changes in a way its
traced graph would not see (new modules, tensors or hooks; changed public attributes, which
torch.fx bakes into the graph as constants), unused while any module is in train mode."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engines.model_key import graph_key, same_key
from engines.split import LayerSplit

__all__ = ["SplitSlot"]


class SplitSlot:
    """An engine's `LayerSplit`, kept out of the module tree (not in `state_dict()`), out of
    pickles and deep copies (rebuilt on first use), and rebuilt when anything a traced graph
    depends on besides tensor values changed: the modules, the parameter/buffer objects (e.g.
    `model.to(device)` swaps buffers), the hooks, plain Python attributes (torch.fx bakes them
    into the graph as constants). None while any model module is in train mode: dropout and
    batch-norm statistics must see every pass and row, as in whole forwards."""

    def __init__(self, channel_delta: bool = False, fold: bool = False) -> None:
        self.channel_delta = channel_delta
        self.fold = fold                   # TTT: also build the rotation fold (`cut_rotated`)
        self._split: LayerSplit | None = None
        self._key: tuple[list, list, list] = ([], [], [])
        self._sticky = False               # the last refusal stands until the structure changes
        self._call: object = None          # the adapt() call the answer below was given for
        self._answer: LayerSplit | None = None

    def __getstate__(self) -> dict:
        return {"channel_delta": self.channel_delta, "fold": self.fold}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def get(self, model: nn.Module, layer: str, x: torch.Tensor, call: object = None,
            rows_check: Callable[[], tuple[torch.Tensor, int]] | None = None
            ) -> LayerSplit | None:
        """The split for `model` at `layer` (built on first use from x's first rows); None when
        it cannot be used. `call`: a token of the current adapt() call — the model cannot change
        within one, so the checks run once per call (None: check now). `rows_check()` -> (X, n): see
        `LayerSplit.build`."""
        if call is not None and call is self._call:
            return self._answer
        self._call, self._answer = call, None
        if any(m.training for m in model.modules()):
            return None
        # modules the graph calls as a whole may change their own attributes (an old-style
        # weight_norm sets .weight at every call): the graph does not depend on those
        leaves = self._split.leaves if self._split is not None else frozenset()
        # after a refusal because the model changes its state in forward, only new modules,
        # tensors or hooks are worth a new try (else it would be re-traced, and warn, at every
        # call); after other refusals any change is
        if not same_key(graph_key(model, leaves), self._key, structure_only=self._sticky):
            self._split, self._sticky = LayerSplit.attempt(
                # copies: a model that changes its input in place must not change the caller's
                model, layer, x[:4].detach().clone(), channel_delta=self.channel_delta,
                rows_check=rows_check() if rows_check is not None else None,
                fold_check=x[:2].detach().clone() if self.fold else None)
            leaves = self._split.leaves if self._split is not None else frozenset()
            self._key = graph_key(model, leaves)
        self._answer = self._split
        return self._split
