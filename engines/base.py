"""The engine contract: registry, `AdaptResult`, and `Engine` — joint training, the anytime
adaptation loop, episodic/online state, and the torch-ttt-style facade.

A method subclasses `Engine` and supplies three things: `_build_aux` (its head/embedder, built
eagerly from a dry forward), `training_loss`, and `_step_loss` (the self-supervised loss at the
current weights together with the main prediction that the same forward gives for free).
A method whose step is not one plain gradient step (a two-pass sharpness-aware step, a teacher
update, a statistics or output update without gradients) overrides `_step` instead; one with
no auxiliary part sets `needs_joint_training = False` (and its config may need no `layer`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from engines.config import EngineConfig
from engines.hooks import DryRun, dry_run, find_module
from engines.split import LayerSplit
from engines.split_cache import SplitSlot

__all__ = ["AdaptResult", "Engine", "config_from_dict", "entropy_gate", "get_engine",
           "list_engines", "register_engine"]

_ENGINES: dict[str, type[Engine]] = {}
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_OPTIMIZERS = {"adam": (torch.optim.Adam, {}), "sgd": (torch.optim.SGD, {"momentum": 0.9})}


def register_engine(name: str) -> Callable[[type[Engine]], type[Engine]]:
    """Class decorator: `@register_engine("ttt")` makes `get_engine("ttt")` return the class."""
    def deco(cls: type[Engine]) -> type[Engine]:
        if name in _ENGINES and _ENGINES[name] is not cls:
            raise ValueError(f"engine {name!r} is already registered; pick another name")
        cls.name = name
        _ENGINES[name] = cls
        return cls
    return deco


def list_engines() -> list[str]:
    return sorted(_ENGINES)


def get_engine(name: str) -> type[Engine]:
    try:
        return _ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from: {', '.join(list_engines())}") \
            from None


def config_from_dict(name: str, data: dict[str, Any]) -> EngineConfig:
    """The config of engine `name` from its `to_dict()` form (e.g. a checkpoint manifest)."""
    return get_engine(name).config_cls.from_dict(data)


@dataclass(frozen=True)
class AdaptResult:
    """logits (K+1, B, C): the prediction after each step 0..K (0 = unadapted);
    losses (K,): the self-supervised loss at steps 0..K-1 (the loss each step descended)."""

    logits: torch.Tensor
    losses: torch.Tensor


def entropy_gate(logits: torch.Tensor) -> torch.Tensor:
    """Anytime logits (K+1, B, C) -> the same, with step k's row of sample b replaced by step
    0's wherever step k's prediction is not less uncertain (entropy) than step 0's."""
    logp = logits.float().log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)                        # (K+1, B)
    keep = entropy < entropy[:1]                                  # step 0 never "keeps": itself
    return torch.where(keep[..., None], logits, logits[:1])


def _truthy(value: Any) -> bool:
    if isinstance(value, str):  # torch-ttt users write copy_model="False"
        return value.strip().lower() not in ("", "0", "false", "no", "off")
    return bool(value)


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (`empty_like` keeps exactly those strides): a gradient can
    then be laid out like it, which fused optimizers need."""
    return torch.empty_like(t).stride() == t.stride()


def _like(grad: torch.Tensor | None, param: torch.Tensor) -> torch.Tensor | None:
    """`grad` with `param`'s strides. autograd.grad, unlike `backward()`, does not lay a
    gradient out like its parameter (e.g. a channels_last 4-D parameter added to activations,
    or a kernel read through rot90, gets a contiguous one), and fused Adam pairs parameter and
    gradient elements by memory position."""
    if grad is None or grad.stride() == param.stride():
        return grad
    return torch.empty_like(param).copy_(grad)


@contextmanager
def _channels_last(tensors: list[torch.Tensor]) -> Iterator[None]:
    """Re-stride the 4-D tensors channels_last for the block (oneDNN convolutions and max-pooling
    run ~1.5x faster on CPU), then back to their own strides. In place: parameters keep their
    identity; outside the block the layout is the user's, so an optimizer the user holds never
    sees a parameter whose strides differ from its state's (fused Adam would pair the wrong
    elements)."""
    moved = []
    with torch.no_grad():
        for t in tensors:
            if t.dim() == 4 and _dense(t):  # an expanded (stride-0) tensor cannot get its
                # strides back; `.to` also re-strides C=1 (`contiguous` does not)
                fast = t.data.to(memory_format=torch.channels_last)
                if fast.stride() != t.data.stride():
                    moved.append((t, t.data.stride()))
                    t.data = fast
    try:
        yield
    finally:
        with torch.no_grad():
            for t, stride in moved:
                back = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device)
                t.data = back.copy_(t.data)


class Engine(nn.Module):
    """`Engine(model, example_input, config=None)`: the model plus its auxiliary part.

    `adapt()` changes only `adapted_parameters()`; in episodic mode it restores them (and every
    buffer) bit-identically from a per-batch snapshot and clears the optimizer state.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[EngineConfig]] = EngineConfig
    needs_joint_training: ClassVar[bool] = True  # False: no auxiliary part, any source model

    def __init__(self, model: nn.Module, example_input: torch.Tensor,
                 config: EngineConfig | dict[str, Any] | None = None):
        super().__init__()
        if config is None:
            config = self.config_cls()
        elif isinstance(config, dict):
            config = self.config_cls.from_dict(config)
        if not isinstance(config, self.config_cls):
            raise ValueError(f"{type(self).__name__} needs a {self.config_cls.__name__}, "
                             f"got {type(config).__name__}")
        self.model = model
        self.config = config
        self.layer_name = config.layer
        if config.layer or type(config).requires_layer:
            find_module(model, config.layer)  # one-line ValueError naming the valid layers
        probe = dry_run(model, example_input, config.layer)
        first = next(model.parameters(), None)
        device = first.device if first is not None else example_input.device
        dtype = first.dtype if first is not None else torch.float32
        self._split = SplitSlot()  # the cut at the layer (split_model); _build_aux may tune it
        self._build_aux(probe, torch.Generator().manual_seed(config.seed), device, dtype)
        self._channels_last_ok = config.channels_last and self._runs_channels_last(example_input)
        self._adapted_names = self._select_adapted(config.adapt_params, probe)
        self.optimization_parameters: dict[str, Any] = {
            "num_steps": config.steps, "lr": config.lr, "optimizer_name": config.optimizer,
            "copy_model": config.mode == "episodic"}
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        self._optimizer(config.optimizer)  # built once, eagerly; its state is reset per batch
        self._batch_start: list[torch.Tensor] | None = None  # per-batch snapshot (reused)
        self._origin: list[torch.Tensor] | None = None       # where reset() returns to
        self._adapt_token: object | None = None  # set during adapt(): per-call caches key on it

    def _runs_channels_last(self, example_input: torch.Tensor) -> bool:
        """Whether the model gives the same logits with channels_last conv weights. A forward
        that `.view()`s a conv output fails on channels_last activations (reshape/flatten work):
        then adaptation keeps the user's layout, with a warning saying why."""
        # a random input, not the example: zeros through batch-statistics norm amplify rounding
        x = example_input
        if x.is_floating_point():
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(x.shape, generator=gen).to(x)
        try:
            plain = dry_run(self.model, x, self.config.layer).logits
            with _channels_last([*self.model.parameters(), *self.model.buffers()]):
                again = dry_run(self.model, x, self.config.layer).logits
            if torch.allclose(again, plain, rtol=1e-4, atol=1e-5, equal_nan=True):
                return True
            why = "its logits differ"
        except RuntimeError as exc:
            why = str(exc).strip().splitlines()[0]
        warnings.warn(f"channels_last off for {type(self.model).__name__}: with channels_last "
                      f"conv weights {why}; adapting in its own layout (use reshape/flatten "
                      f"instead of view for ~1.5x faster CPU convs, or set channels_last=False)",
                      RuntimeWarning, stacklevel=3)
        return False

    def _split_for(self, x: torch.Tensor,
                   rows_check: Callable[[], tuple[torch.Tensor, int]] | None = None
                   ) -> LayerSplit | None:
        """The model cut at the layer for this `adapt()` call (`split_model`), or None: whole
        forwards (the option off, outside `adapt()`, or a model the split refuses)."""
        if not self.config.split_model or self._adapt_token is None:
            return None
        return self._split.get(self.model, self.layer_name, x, self._adapt_token, rows_check)

    # -- what a method supplies -------------------------------------------------------------
    def _build_aux(self, probe: DryRun, generator: torch.Generator,
                   device: torch.device, dtype: torch.dtype) -> None:
        raise NotImplementedError

    def training_loss(self, x: torch.Tensor, y: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, C), aux_loss scalar) for joint training."""
        raise NotImplementedError

    def _step_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(main logits at the current weights, self-supervised loss to descend)."""
        raise NotImplementedError

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The main prediction at the current weights (no adaptation)."""
        return self.model(x)

    def _begin_batch(self, start: dict[str, torch.Tensor]) -> None:
        """Called with the adapted tensors as they were at the start of the batch."""

    # -- joint training ---------------------------------------------------------------------
    def joint_loss(self, x: torch.Tensor, y: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(CE(logits, y) + aux_weight * aux_loss, logits, aux_loss)."""
        logits, aux_loss = self.training_loss(x, y)
        return F.cross_entropy(logits, y) + self.config.aux_weight * aux_loss, logits, aux_loss

    # -- adapted parameters and state -------------------------------------------------------
    def _select_adapted(self, kind: str, probe: DryRun) -> list[str]:
        if kind == "none":  # a method that changes no parameter (e.g. statistics, outputs)
            return []
        if kind == "all":
            names = [n for n, _ in self.named_parameters()]
        elif kind == "model":
            names = [f"model.{n}" for n, _ in self.model.named_parameters()]
        elif kind == "encoder":
            ran = probe.order[:probe.order.index(self.layer_name) + 1]
            names = [f"model.{m}.{n}" for m in ran
                     for n, _ in self.model.get_submodule(m).named_parameters(recurse=False)]
        else:  # "norm"
            names = [f"model.{m}.{n}" for m, mod in self.model.named_modules()
                     if isinstance(mod, _NORM_TYPES)
                     for n, _ in mod.named_parameters(recurse=False)]
        params = dict(self.named_parameters())
        names = [n for n in names if params[n].requires_grad]
        if not names:
            raise ValueError(f"adapt_params={kind!r} selects no trainable parameter in "
                             f"{type(self.model).__name__}; choose another adapt_params")
        for n in names:
            if any(st == 0 and size > 1 for st, size in zip(params[n].stride(), params[n].shape)):
                raise ValueError(f"parameter {n} is an expanded view (stride 0), which no "
                                 f"optimizer can step in place; give it its own memory "
                                 f"(nn.Parameter(t.clone())) or set requires_grad=False")
        return names

    def adapted_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The (name, parameter) pairs adaptation may change, named as in `state_dict()`."""
        params = dict(self.named_parameters())
        return [(n, params[n]) for n in self._adapted_names]

    def adapted_buffers(self) -> list[tuple[str, torch.Tensor]]:
        """The (name, buffer) pairs adaptation may change besides the parameters (a method's
        own state, e.g. a teacher or a moving average); restored like the parameters."""
        return []

    def _state(self) -> list[torch.Tensor]:
        """What a batch may change: the adapted parameters, then every buffer."""
        return [p for _, p in self.adapted_parameters()] + [b for _, b in self.named_buffers()]

    @staticmethod
    def _save(into: list[torch.Tensor] | None, state: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copy `state` into the reusable snapshot `into` (re-allocated if device/shape moved)."""
        with torch.no_grad():
            if into is None or len(into) != len(state) or any(
                    a.device != b.device or a.shape != b.shape or a.dtype != b.dtype
                    for a, b in zip(into, state)):
                return [t.detach().clone() for t in state]
            for dst, src in zip(into, state):
                dst.copy_(src)
            return into

    @staticmethod
    def _load(state: list[torch.Tensor], snapshot: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for dst, src in zip(state, snapshot):
                dst.copy_(src)

    def snapshot(self) -> None:
        """Mark the current weights as where `reset()` returns to."""
        self._origin = self._save(self._origin, self._state())

    def reset(self) -> None:
        """Undo online adaptation: restore the weights at the start of the online run (the
        first online `adapt()` after construction, `reset()` or `snapshot()`), clear the
        optimizer state."""
        if self._origin is not None:
            self._load(self._state(), self._origin)
            self._origin = None
        for opt in self._optimizers.values():
            opt.state.clear()

    def _optimizer(self, name: str) -> torch.optim.Optimizer | None:
        params = [p for _, p in self.adapted_parameters()]
        if not params:  # adapt_params="none": nothing to step
            return None
        opt = self._optimizers.get(name)
        if opt is None or opt.param_groups[0]["params"][0] is not params[0]:
            if name not in _OPTIMIZERS:
                raise ValueError(f"unknown optimizer {name!r}; choose from: adam, sgd")
            cls, kwargs = _OPTIMIZERS[name]
            if name == "adam":
                kwargs = {**kwargs, "eps": self.config.adam_eps}
            try:  # the fused kernel: one call per step instead of a Python loop per tensor
                if not all(_dense(p) for p in params):
                    raise ValueError("fused Adam pairs elements by memory position")
                opt = cls(params, lr=self.config.lr, fused=True, **kwargs)
            except (RuntimeError, ValueError):
                opt = cls(params, lr=self.config.lr, **kwargs)
            self._optimizers[name] = opt
        elif any(t.dtype != p.dtype or t.device != p.device for p, st in opt.state.items()
                 for t in st.values() if isinstance(t, torch.Tensor) and t.dim()):
            opt.state.clear()  # the engine was moved (`.to(...)`) during an online run
        return opt

    # -- test-time adaptation -------------------------------------------------------------
    def adapt(self, x: torch.Tensor, steps: int | None = None, lr: float | None = None, *,
              mode: str | None = None, optimizer: str | None = None) -> AdaptResult:
        """Adapt on batch `x` for `steps` steps; return the prediction after every step.

        Step k's logits come from the forward that computes step k+1's loss, so the whole
        0..K sweep costs K forward/backward passes plus one final no-grad forward; they equal
        a run with steps=k (same weights, same optimizer state). Works under an outer
        `torch.no_grad()`/`inference_mode()`; runs in the module's current train/eval mode.
        """
        steps = self.config.steps if steps is None else int(steps)
        lr = self.config.lr if lr is None else float(lr)
        mode = self.config.mode if mode is None else mode
        if steps < 0 or not lr > 0:
            raise ValueError(f"adapt needs steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
        if mode not in ("episodic", "online"):
            raise ValueError(f"unknown mode {mode!r}; choose from: episodic, online")
        self._begin_adapt()
        opt = self._optimizer(optimizer or self.config.optimizer)
        for group in opt.param_groups if opt is not None else ():
            group["lr"] = lr
        named = self.adapted_parameters()
        params = [p for _, p in named]
        episodic = mode == "episodic"
        layout = [*self.parameters(), *self.buffers()] if self._channels_last_ok else []
        with torch.inference_mode(False), torch.enable_grad(), _channels_last(layout):
            if x.is_inference():
                x = x.clone()  # inference tensors cannot be saved for backward
            state = self._state()
            if episodic or self._wants_batch_start:
                self._batch_start = self._save(self._batch_start, state)
            if not episodic and self._origin is None:
                self._origin = self._save(None, state)
            if self._wants_batch_start:
                self._begin_batch({n: t for (n, _), t in zip(named, self._batch_start)})
            user_grads = [p.grad for p in params]
            logits, losses = [], []
            self._adapt_token = object()
            try:
                for _ in range(steps):
                    pred, loss = self._step(x, params, opt)
                    logits.append(pred.detach())
                    losses.append(loss.detach())  # kept as tensors: no CPU-GPU sync per step
                with torch.no_grad():
                    logits.append(self.predict(x))
            finally:
                self._adapt_token = None
                for p, g in zip(params, user_grads):
                    p.grad = g
                if episodic:
                    self._load(state, self._batch_start)
                    if opt is not None:
                        opt.state.clear()
        losses_t = torch.stack(losses) if losses else logits[0].new_zeros(0)
        stacked = torch.stack(logits)
        if self.config.gate == "entropy":
            stacked = entropy_gate(stacked)
        return AdaptResult(logits=stacked, losses=losses_t)

    def _step(self, x: torch.Tensor, params: list[nn.Parameter],
              opt: torch.optim.Optimizer | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One adaptation step: (the main logits at the weights before it, the loss it took).
        Default: one gradient step of `opt` on `_step_loss`."""
        pred, loss = self._step_loss(x)
        if not loss.requires_grad:
            raise ValueError(f"the {self.name} loss does not depend on the adapted "
                             f"parameters; choose another adapt_params")
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = _like(g, p)
        opt.step()
        return pred, loss

    _wants_batch_start: ClassVar[bool] = False  # True if `_begin_batch` needs the snapshot

    def _begin_adapt(self) -> None:
        """Called at the start of every `adapt()` call and batched episode group (e.g. to
        re-seed a generator the loss draws from)."""

    def adapt_episodes(self, xs: torch.Tensor, steps: int | None = None,
                       lr: float | None = None, *, optimizer: str | None = None) -> AdaptResult:
        """G episodic problems xs (G, B, ...) at once: logits (K+1, G, B, C), losses (K, G),
        each slice equal to an episodic `adapt(xs[g])` within float tolerance
        (engines/batched.py)."""
        from engines.batched import adapt_episodes  # engines.batched imports this module
        return adapt_episodes(self, xs, steps, lr, optimizer=optimizer)

    # -- torch-ttt facade -------------------------------------------------------------------
    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """torch-ttt style: in train mode (logits, aux_loss); in eval mode adapt with
        `optimization_parameters` and return (final logits, final loss)."""
        if self.training:
            return self.training_loss(x, target)
        op = self.optimization_parameters
        result = self.adapt(
            x, steps=op.get("num_steps", self.config.steps), lr=op.get("lr", self.config.lr),
            optimizer=op.get("optimizer_name", self.config.optimizer),
            mode="episodic" if _truthy(op.get("copy_model", True)) else "online")
        loss = result.losses[-1] if len(result.losses) else result.logits.new_zeros(())
        return result.logits[-1], loss
