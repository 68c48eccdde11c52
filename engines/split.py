"""A model cut at a named layer (torch.fx), so an engine can skip repeated work at test time.

IT3 runs the model twice per step on the same x; the passes differ only in what is added to
one layer's output. Everything that does not depend on that output — the prefix — is the same
computation in both passes (torch_ttt variant: same weights; paper variant: the frozen anchor,
whose prefix is constant for the whole batch). `LayerSplit` traces the model once and splits its
graph there: `prefix(x)` returns the values the rest needs ("cut" values: the layer's output
plus any earlier value the rest reads, such as a skip connection), `suffix(cut, delta)` adds
delta to the layer's output and runs the rest. Autograd sums both passes' gradients into the
shared prefix, so the prefix's forward and backward run once instead of twice.

With a per-channel delta (B, C) on a (B, C, H, W) output, the add is moved past max-pooling
that directly follows the layer: max(a + c) == max(a) + c for a constant c per window, exactly
in floating point (rounding is monotonic), so the pooling joins the shared prefix too. Only the
pooling's gradient routing can differ, and only where two window entries become equal after
rounding (either is a valid subgradient).

TTT uses the same cut the other way round: its rotated copies only feed the head on the
layer's features, so the rest runs on the unrotated rows only (`rows`; the values that carry the
batch's rows are found from two batch sizes, and the rest on a subset of rows is checked
against the whole model, which refuses models that read the batch size or mix rows).

`LayerSplit.build` returns None with a RuntimeWarning naming the reason — and the caller keeps
its whole, hook-based forwards — when the model cannot be traced symbolically, the layer runs
more or less than once, there are backward hooks or hooks on the model itself, or the split
model's output differs from the hooked model's on a check batch (e.g. an in-place op on the
layer's output would let one pass change the other's input), or the model sets its own
attributes in forward. `engines/split_cache.py` keeps one split per engine up to date.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp
from torch import nn
from torch.func import functional_call

from engines.hooks import add_delta, add_to_output, has_forward_hooks
from engines.model_key import changes_in_forward, model_state
from engines.rotation_fold import Fold, fold_rotations, in_place, rotated_copies

__all__ = ["LayerSplit", "tensor_slots"]

_MAX_POOLS = (F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool1d, torch.max_pool2d,
              torch.max_pool3d)


def tensor_slots(module: nn.Module) -> dict[str, torch.Tensor]:
    """Each (module, attribute) slot that holds a parameter or buffer, once, by one of its
    names: what `functional_call(..., tie_weights=False)` must be given to replace a tensor
    everywhere. A module registered under two names is one slot (naming it twice makes
    torch.func restore the wrong tensor); a weight tied into two modules is two slots."""
    seen: set[tuple[int, str]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in [*module.named_parameters(remove_duplicate=False),
                    *module.named_buffers(remove_duplicate=False)]:
        owner, _, attr = name.rpartition(".")
        slot = (id(module.get_submodule(owner)), attr)
        if slot not in seen:
            seen.add(slot)
            out[name] = t
    return out


class _NoSplit(Exception):
    """Why a model cannot be split at a layer."""


class _SideEffects(_NoSplit):
    """The model changes its own state in forward."""


class _Proxy(fx.Proxy):
    """A traced value that refuses attribute writes: `h.data = h.data.clamp(...)` would set an
    attribute on the proxy and leave the graph without the clamp."""

    def __setattr__(self, name: str, value) -> None:
        if name in ("node", "tracer"):
            return super().__setattr__(name, value)
        raise RuntimeError(f"the model sets {name!r} on a tensor in forward")


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping the chosen layer as one call even if it is a container."""

    def __init__(self, layer: str):
        super().__init__()
        self.layer = layer

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # a module with forward hooks stays one call, so its hooks run in the split as well
        return (qualname == self.layer or has_forward_hooks(m)
                or super().is_leaf_module(m, qualname))


def _hook_problem(model: nn.Module) -> str | None:
    """Hooks a split cannot honour: on the model itself (it is never called as a whole) and
    backward hooks anywhere (the passes' gradients flow differently through a split)."""
    if has_forward_hooks(model):
        return "forward hooks on the model itself"
    for name, m in model.named_modules():
        if m._backward_hooks or m._backward_pre_hooks:
            return f"backward hooks on {name or 'the model'}"
    return None


def _is_max_pool(node: fx.Node, root: nn.Module) -> bool:
    """A max-pooling call (functional or module) that returns values only."""
    if node.op == "call_function" and node.target in _MAX_POOLS:
        # F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
        return not node.kwargs.get("return_indices", node.args[6] if len(node.args) > 6 else False)
    if node.op == "call_module":
        mod = root.get_submodule(node.target)
        return isinstance(mod, nn.modules.pooling._MaxPoolNd) and not mod.return_indices
    return False


@dataclass
class LayerSplit:
    """prefix: x -> cut values (the injection point's value first); suffix: (*cut, delta) ->
    the model's output. Both hold the model's own submodules and tensors (no copies)."""

    prefix: fx.GraphModule
    suffix: fx.GraphModule
    injection: str           # where delta is added: the layer, or a max-pool right after it
    suffix_names: dict       # suffix's parameter/buffer name -> the model's (functional_call)
    batch_rows: frozenset | None = None  # cut indices whose dim 0 is the batch (rows_check)
    leaves: frozenset = frozenset()      # modules the graph calls as a whole
    rotated: fx.GraphModule | None = None  # x -> prefix(rotated copies of x), folded (fold_check)
    rotated_shape: tuple | None = None     # the image shape (C, H, W) it was built and checked for
    fresh_cut: bool = False   # the rest changes tensors in place: each run gets copies of cut

    @classmethod
    def build(cls, model: nn.Module, layer: str, check_x: torch.Tensor,
              channel_delta: bool,
              rows_check: tuple[torch.Tensor, int] | None = None,
              fold_check: torch.Tensor | None = None) -> LayerSplit | None:
        """Trace `model` and cut it at `layer`; None (and a RuntimeWarning saying why) when that
        is not possible. `channel_delta`: the deltas will be (B, C) per-channel shifts (allows
        the max-pool move). The split is checked against the hooked model on `check_x`;
        `rows_check` (X, n): the rest will also run on the first rows of a cut (TTT's unrotated
        quarter), checked as rest(first n rows of cut(X)) == model(X)[:n]. `fold_check` x: also
        build `rotated` (TTT; engines/rotation_fold.py), checked as rotated(x) ==
        prefix(rotated copies of x); if nothing folds or it disagrees, `rotated` stays None."""
        return cls.attempt(model, layer, check_x, channel_delta, rows_check, fold_check)[0]

    @classmethod
    def attempt(cls, model: nn.Module, layer: str, check_x: torch.Tensor, channel_delta: bool,
                rows_check: tuple[torch.Tensor, int] | None = None,
                fold_check: torch.Tensor | None = None) -> tuple[LayerSplit | None, bool]:
        """`build`, plus whether a refusal should stand until the model's structure changes
        (a model with side effects in forward changes its attributes at every call)."""
        try:
            return cls._build(model, layer, check_x, channel_delta, rows_check, fold_check), False
        except Exception as exc:  # noqa: BLE001 - no split is always a correct fallback
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            warnings.warn(f"split_model: cannot split {type(model).__name__} at {layer!r} "
                          f"({why}); running whole forwards", RuntimeWarning, stacklevel=3)
            return None, isinstance(exc, _SideEffects)

    @classmethod
    def _build(cls, model: nn.Module, layer: str, check_x: torch.Tensor,
               channel_delta: bool, rows_check: tuple[torch.Tensor, int] | None,
               fold_check: torch.Tensor | None = None) -> LayerSplit:
        """Everything that runs Python code of the model — tracing and the checks — runs on a
        deep copy (`probe`), so the user's model is never touched; the split returned holds
        the user's own modules and tensors."""
        if (problem := _hook_problem(model)) is not None:
            raise _NoSplit(problem)
        untouched = model_state(model)
        memo: dict = {}
        try:
            probe = copy.deepcopy(model, memo)
        except Exception as exc:  # noqa: BLE001
            raise _NoSplit(f"the model cannot be deep-copied for the checks: {exc}") from exc
        # probe object -> the model's original (a tensor the model keeps in a list must stay
        # the model's own in the split, not the copy's)
        originals = {id(memo[id(o)]): o for o in memo.get(id(memo), []) if id(o) in memo}
        try:
            graph = _Tracer(layer).trace(probe)
        except Exception as exc:  # noqa: BLE001 - data-dependent control flow and the like
            raise _NoSplit(f"torch.fx cannot trace it: {type(exc).__name__}") from exc
        leaves = frozenset(n.target for n in graph.nodes if n.op == "call_module")
        if changes_in_forward(probe, check_x, leaves):
            raise _SideEffects("the model changes its own state in forward, which a traced "
                               "graph does not replay")
        nodes = list(graph.nodes)
        hits = [n for n in nodes if n.op == "call_module" and n.target == layer]
        if len(hits) != 1:
            raise _NoSplit(f"the layer runs {len(hits)} times in a forward, not once")
        inj = hits[0]
        while channel_delta and len(inj.users) == 1:
            (user,) = inj.users
            if _is_max_pool(user, probe) and user.args and user.args[0] is inj:
                inj = user
            else:
                break
        output = next(n for n in nodes if n.op == "output")
        later: set[fx.Node] = set()            # nodes that depend on the injection point
        data: set[fx.Node] = set()             # nodes that depend on the input (the batch)
        for n in nodes:
            if n.op == "placeholder" or any(a in data for a in n.all_input_nodes):
                data.add(n)
            if n is not inj and any(a is inj or a in later for a in n.all_input_nodes):
                later.add(n)
        if output not in later:
            raise _NoSplit("the model's output does not depend on the layer")
        after = nodes[nodes.index(inj) + 1:]
        if any(n not in later and in_place(n, probe) for n in after):
            # it would run in the prefix, before the rest reads what it changes
            raise _NoSplit("an in-place op after the layer changes a value from before it")
        # the values the rest reads from before the cut: computed once if they depend on the
        # batch; weight-only values (a parameter read after the layer, w.exp(), ...) are
        # recomputed in the rest, so functional_call's weights (IT3's frozen anchor) reach them
        cut = [inj] + [n for n in nodes if n is not inj and n not in later and n in data
                       and any(u in later for u in n.users)]

        pre = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for n in nodes:
            if n not in later and n is not output:
                env[n] = pre.node_copy(n, lambda a: env[a])
        pre.output(tuple(env[c] for c in cut))

        suf = fx.Graph()
        env = {c: suf.placeholder(f"cut_{i}") for i, c in enumerate(cut)}
        delta = suf.placeholder("delta")
        env[inj] = suf.call_function(add_delta, (env[inj], delta))
        for n in nodes:
            if n not in data and n not in later and n is not output:
                env[n] = suf.node_copy(n, lambda a: env[a])           # weight-only values
        for n in nodes:
            if n in later and n is not output:
                env[n] = suf.node_copy(n, lambda a: env[a])
        suf.output(fx.node.map_arg(output.args[0], lambda a: env[a]))

        checked = cls._assemble(probe, probe, pre, suf, layer, inj is hits[0], inj.name, {})
        if checked._changes_cut(check_x):  # the rest changes (a view of) a cut value in place
            if rows_check is not None:
                # TTT: the head reads the layer's features of all 4B rows, which whole
                # forwards' rest changes (the split's rest runs on the first B rows only)
                raise _NoSplit("the rest of the model changes a value from before it in place")
            if any(n in data and n not in later for n in after[
                    min(after.index(n) for n in after if n in later):]):
                # a value the prefix computes after the layer ran would miss the change
                raise _NoSplit("a value from before the layer is read after an in-place op")
            checked.fresh_cut = True
        if not checked._agrees(probe, layer, check_x):
            raise _NoSplit("the split model's output differs from the model's: a forward hook on "
                           "a module torch.fx traces through, or an in-place op on the layer's "
                           "output?")
        if rows_check is not None and not checked._rows_agree(probe, *rows_check):
            raise _NoSplit("the rest of the model gives other results on a subset of the rows; "
                           "does it read the batch size (x.size(0)) or mix rows?")
        folded = _checked_fold(checked.prefix, fold_check) if fold_check is not None else None
        split = cls._assemble(model, probe, copy.deepcopy(pre), copy.deepcopy(suf), layer,
                              inj is hits[0], inj.name, originals)
        split.batch_rows, split.leaves = checked.batch_rows, leaves
        split.fresh_cut = checked.fresh_cut
        if folded is not None:
            split.rotated = _module(folded.graph, model, probe, originals, "RotatedPrefix")
            split.rotated_shape = tuple(fold_check.shape[1:])
            # the fold baked in these modules' attributes (stride, padding, inplace, ...):
            # a change to them must rebuild the split (SplitSlot keys on non-leaf attributes)
            split.leaves = leaves - folded.modules
        if model_state(model) != untouched:
            raise _SideEffects("the checks on a copy changed the model itself (it reaches its "
                               "state through something deepcopy shares: a weakref, a closure, "
                               "a hook)")
        return split

    @classmethod
    def _assemble(cls, model: nn.Module, probe: nn.Module, pre: fx.Graph, suf: fx.Graph,
                  layer: str, at_layer: bool, inj_name: str, originals: dict) -> LayerSplit:
        """GraphModules over `model`'s own modules and tensors (constants the tracer made live
        only on `probe`, the traced copy: mapped back to the model's by `originals`)."""
        prefix = _module(pre, model, probe, originals, "Prefix")  # dead code: e.g. a branch
        suffix = _module(suf, model, probe, originals, "Suffix")  # only the rest used
        # the model's name of each tensor the rest uses (tied weights: one name, two places)
        canonical = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
        names = {n: canonical[id(t)] for n, t in tensor_slots(suffix).items()
                 if id(t) in canonical}
        return cls(prefix, suffix, layer if at_layer else inj_name, names)

    def cut(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.prefix(x)

    def cut_rotated(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`cut(rotated_copies(x))`, with the rotations folded into the leading convolutions
        when `rotated` was built for images of x's shape."""
        if self.rotated is not None and tuple(x.shape[1:]) == self.rotated_shape:
            return self.rotated(x)
        return self.prefix(rotated_copies(x))

    def rows(self, cut: tuple, n: int) -> tuple:
        """The cut values of the first n rows: the values that carry the batch's rows (found
        when the split was checked for it, `rows_check`) sliced to [:n], the others as they
        are (weight-derived values, sizes)."""
        if self.batch_rows is None:
            raise RuntimeError("this split was not checked for running on a subset of rows")
        return tuple(c[:n] if i in self.batch_rows else c for i, c in enumerate(cut))

    def run(self, cut: tuple[torch.Tensor, ...], delta: torch.Tensor | None,
            params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The model's output with `delta` added at the layer, from the prefix's `cut`; with
        `params`, the suffix's weights are replaced by those of them it uses (names as in the
        model's state_dict)."""
        if self.fresh_cut:  # IT3 runs the rest twice on one cut (and keeps the anchor's)
            cut = tuple(c.clone() if isinstance(c, torch.Tensor) else c for c in cut)
        if params is None:
            return self.suffix(*cut, delta)
        own = {n: params[m] for n, m in self.suffix_names.items() if m in params}
        return functional_call(self.suffix, own, (*cut, delta), tie_weights=False)  # all names

    def _changes_cut(self, x: torch.Tensor) -> bool:
        """Whether the rest changes a cut value (or a view of one) in place: torch's version
        counter, which views share, counts every in-place op, whether it changed a value on x
        or not. Copies per run (`fresh_cut`) then keep IT3's two passes apart, unless two cut
        values share memory (a copy of one would not be seen through the other)."""
        with torch.no_grad():
            cut = self.cut(x)
            tensors = [c for c in cut if isinstance(c, torch.Tensor)]
            before = [t._version for t in tensors]
            self.suffix(*cut, None)
        if all(t._version == v for t, v in zip(tensors, before)):
            return False
        memory = [t.untyped_storage().data_ptr() for t in tensors]
        if len(set(memory)) < len(memory):
            raise _NoSplit("the rest of the model changes in place a value from before it that "
                           "another such value views")
        return True

    def _agrees(self, model: nn.Module, layer: str, x: torch.Tensor) -> bool:
        """Split == hooked model on x, without and with a random per-channel delta."""
        with torch.no_grad():
            full = model(x)
            cut = self.cut(x)
            if not isinstance(cut[0], torch.Tensor) or cut[0].dim() < 2:
                return False
            delta = torch.randn(x.shape[0], cut[0].shape[1], device=x.device, dtype=full.dtype,
                                generator=torch.Generator(x.device).manual_seed(0))
            with add_to_output(model.get_submodule(layer), delta):
                full_d = model(x)
            close = dict(rtol=1e-4, atol=1e-5, equal_nan=True)
            ok = torch.allclose(self.run(cut, None), full, **close)
            return ok and torch.allclose(self.run(cut, delta), full_d, **close)

    def _rows_agree(self, model: nn.Module, x: torch.Tensor, n: int) -> bool:
        """Find the cut values that carry the batch's rows (dim 0 follows the batch size over
        two batch sizes), then check: the rest run on the first n rows of x's cut == the first
        n rows of model(x); fails when the rest reads the batch size or mixes rows (e.g.
        batch statistics)."""
        m = x.shape[0] // 2
        if not 0 < n <= m:
            return False
        with torch.no_grad():
            cut, half = self.cut(x), self.cut(x[:m])
            self.batch_rows = frozenset(
                i for i, (a, b) in enumerate(zip(cut, half))
                if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == x.shape[0]
                and isinstance(b, torch.Tensor) and b.dim() and b.shape[0] == m)
            if 0 not in self.batch_rows:
                return False
            try:
                part = self.run(self.rows(cut, n), None)
            except RuntimeError:
                return False
            return torch.allclose(part, model(x)[:n], rtol=1e-4, atol=1e-5, equal_nan=True)


def _module(graph: fx.Graph, model: nn.Module, probe: nn.Module, originals: dict, name: str
            ) -> fx.GraphModule:
    gm = fx.GraphModule(_root(graph, model, probe, originals), graph, class_name=name)
    # what only the other part used goes; an op whose result is unused but that changes a
    # tensor in place (h.clamp_(max=1), h[h < 0] = 0) stays: torch.fx counts it as dead
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or in_place(n, gm))
    gm.recompile()
    return gm


def _checked_fold(prefix: fx.GraphModule, x: torch.Tensor) -> Fold | None:
    """`prefix` (on the traced copy) with TTT's rotations folded in (engines/rotation_fold.py),
    checked on x against prefix(rotated copies of x). None when nothing folds, when the fold
    would turn more elements per image back into the 4B batch than an image has (measured:
    the fold pays where it ends in small pooled maps, and costs up to ~20 % where it ends in
    big early ones), or (with a RuntimeWarning) when the values disagree."""
    images = rotated_copies(x)
    try:
        with torch.no_grad():
            ShapeProp(prefix).propagate(images)
            fold = fold_rotations(prefix.graph, prefix)
            if not fold.folded or fold.unstacked > x[0].numel():
                return None  # turning big maps back into 4B costs more than the fold saves
            want, got = prefix(images), fx.GraphModule(prefix, fold.graph)(x)
        close = dict(rtol=1e-4, atol=1e-5, equal_nan=True)
        same = len(want) == len(got) and all(
            torch.allclose(a, b, **close) if isinstance(a, torch.Tensor) else a == b
            for a, b in zip(want, got))
        why = "they give other values than the rotated copies"
    except Exception as exc:  # noqa: BLE001 - the unfolded prefix is always a correct fallback
        same, why = False, str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
    if same:
        return fold
    warnings.warn(f"fold_rotations: cannot fold the rotations into the model ({why}); running "
                  f"its prefix on the 4B rotated images", RuntimeWarning, stacklevel=4)
    return None


def _root(graph: fx.Graph, model: nn.Module, probe: nn.Module, originals: dict) -> dict:
    """The objects a graph's modules/attributes name: the model's; else the traced copy's
    (tensor constants torch.fx stored on the root while tracing), mapped back to the model's
    own object where the copy was made from one."""
    root = {}
    for n in graph.nodes:
        if n.op in ("call_module", "get_attr"):
            for owner in (model, probe):
                obj = owner
                try:
                    for part in n.target.split("."):
                        obj = getattr(obj, part)
                except AttributeError:
                    continue
                root[n.target] = obj if owner is model else originals.get(id(obj), obj)
                break
    return root
