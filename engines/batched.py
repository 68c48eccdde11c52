"""Batched episodes: G independent episodic problems adapted at once.

`adapt_episodes(engine, xs)` adapts G episodes (G batches, or G single images' augmented copies)
from the same starting weights. The adapted parameters are stacked into (G, ...) copies; each
step runs the engine's own loss for every episode at once with `torch.func.vmap` over
`torch.func.functional_call`, and the optimizer steps all copies together. The optimizer is the
engine's own (`torch.optim.Adam` with the config's eps, or SGD with momentum 0.9, fused where
possible) holding one state tensor of shape (G, ...) per parameter: its update is elementwise
and its step count is shared, so each episode's slice gets exactly the update a sequential
episodic `engine.adapt(xs[g])` would. Results equal the sequential path up to float rounding
(a grouped convolution sums in another order than G separate ones).

What the batched path does not use: the model split and the rotation fold (engines/split.py,
engines/rotation_fold.py) and channels_last — the vmapped forward is always the whole model
(the split gives the same values, so predictions agree).

Fallback: a model vmap cannot batch — BatchNorm in train mode (running statistics updated in
place), dropout in train mode (per-episode randomness), a forward that reads tensor values as
Python numbers, or any other error vmap raises on the first batched call — is adapted episode
by episode with the sequential `engine.adapt`, after one RuntimeWarning naming why. The check
is made once per (engine, model, train/eval flags) and cached on the engine.

Per-sample episodic TTT (Sun et al. 2020): `adapt_per_sample(engine, x, copies, seeds)` adapts
each image of x alone on `copies` augmented copies of it (copy 0 is the image itself, the rest
random crops with padding and horizontal flips) and returns the prediction for the image
itself after each step; `episodes` images run at once.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from engines.base import _OPTIMIZERS, AdaptResult, Engine, _dense, _like, entropy_gate
from engines.batched_pool import channel_pooling

__all__ = ["adapt_episodes", "adapt_per_sample", "augmented_copies", "batched_refusal"]

_CACHE_ATTR = "_episodes_check"  # on the engine: (key, refusal reason or None)


class _Call(nn.Module):
    """`forward(x)` = `engine.<method>(x)`: lets functional_call swap the engine's tensors."""

    def __init__(self, engine: Engine, method: str):
        super().__init__()
        self.engine = engine
        self.method = method

    def forward(self, x: torch.Tensor):
        return getattr(self.engine, self.method)(x)


def _key(engine: Engine) -> tuple:
    return (id(engine.model), tuple(m.training for m in engine.modules()))


def _static_refusal(engine: Engine) -> str | None:
    """Why vmap cannot batch this engine's forward, as far as the module types tell."""
    for name, m in engine.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training \
                and m.track_running_stats:
            return (f"{type(m).__name__} {name!r} is in train mode and updates its running "
                    f"statistics in place")
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            return f"{type(m).__name__} {name!r} is in train mode (random masks per episode)"
    return None


def batched_refusal(engine: Engine) -> str | None:
    """The cached reason this engine's episodes run sequentially, or None (batched, or not
    checked yet)."""
    cached = getattr(engine, _CACHE_ATTR, None)
    if cached is None or cached[0] != _key(engine):
        return _static_refusal(engine)
    return cached[1]


def _refuse(engine: Engine, why: str) -> None:
    object.__setattr__(engine, _CACHE_ATTR, (_key(engine), why))
    warnings.warn(f"batched episodes off for {type(engine.model).__name__}: {why}; adapting "
                  f"the episodes one by one (same results, slower)", RuntimeWarning, stacklevel=4)


def _optimizer(engine: Engine, name: str, params: list[torch.Tensor], lr: float
               ) -> torch.optim.Optimizer:
    """The engine's optimizer (engines/base.py: same class, defaults and eps) on `params`."""
    if name not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from: adam, sgd")
    cls, kwargs = _OPTIMIZERS[name]
    if name == "adam":
        kwargs = {**kwargs, "eps": engine.config.adam_eps}
    try:
        if not all(_dense(p) for p in params):
            raise ValueError("fused Adam pairs elements by memory position")
        return cls(params, lr=lr, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return cls(params, lr=lr, **kwargs)


def _stack(p: torch.Tensor, g: int, channels_last: bool) -> torch.Tensor:
    """(G, ...) copies of `p`; a 4-D (conv) weight with each copy laid out channels_last, so
    the grouped convolution vmap makes of it gets a channels_last weight (its output, and the
    max-pooling after it, stay channels_last: ~10x faster pooling on CPU)."""
    if p.dim() != 4 or not channels_last:
        return p.detach().unsqueeze(0).repeat(g, *([1] * p.dim()))
    one = p.detach().to(memory_format=torch.channels_last)
    out = torch.empty_strided((g, *one.shape), (one.numel(), *one.stride()),
                              dtype=one.dtype, device=one.device)
    return out.copy_(one.unsqueeze(0).expand(g, *one.shape))


def _sequential(engine: Engine, xs: torch.Tensor, steps: int, lr: float,
                optimizer: str | None) -> AdaptResult:
    results = [engine.adapt(x, steps, lr, mode="episodic", optimizer=optimizer) for x in xs]
    return AdaptResult(logits=torch.stack([r.logits for r in results], 1),   # (K+1, G, B, C)
                       losses=torch.stack([r.losses for r in results], 1))   # (K, G)


def adapt_episodes(engine: Engine, xs: torch.Tensor, steps: int | None = None,
                   lr: float | None = None, *, optimizer: str | None = None) -> AdaptResult:
    """Adapt G episodes xs (G, B, C, H, W) from the engine's current weights, each as an
    episodic `engine.adapt(xs[g], steps, lr)`; the engine's weights are unchanged afterwards.

    Returns AdaptResult with logits (K+1, G, B, classes) and losses (K, G): slice g equals
    the sequential episode g within float tolerance. G = 1 runs the sequential path.
    """
    steps = engine.config.steps if steps is None else int(steps)
    lr = engine.config.lr if lr is None else float(lr)
    optimizer = optimizer or engine.config.optimizer
    if steps < 0 or not lr > 0:
        raise ValueError(f"adapt_episodes needs steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
    if xs.dim() < 2 or xs.shape[0] < 1:
        raise ValueError(f"adapt_episodes needs xs (G, B, ...) with G >= 1, got "
                         f"{tuple(xs.shape)}")
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from: adam, sgd")
    if xs.shape[0] == 1:
        return _sequential(engine, xs, steps, lr, optimizer)
    cached = getattr(engine, _CACHE_ATTR, None)
    if cached is None or cached[0] != _key(engine):
        why = _static_refusal(engine)
        if why is not None:
            _refuse(engine, why)
            return _sequential(engine, xs, steps, lr, optimizer)
        try:
            result = _batched(engine, xs, steps, lr, optimizer)
        except (RuntimeError, NotImplementedError) as exc:
            _refuse(engine, str(exc).strip().splitlines()[0] if str(exc).strip()
                    else type(exc).__name__)
            return _sequential(engine, xs, steps, lr, optimizer)
        object.__setattr__(engine, _CACHE_ATTR, (_key(engine), None))
        return result
    if cached[1] is not None:
        return _sequential(engine, xs, steps, lr, optimizer)
    return _batched(engine, xs, steps, lr, optimizer)


def _batched(engine: Engine, xs: torch.Tensor, steps: int, lr: float, optimizer: str
             ) -> AdaptResult:
    g = xs.shape[0]
    named = engine.adapted_parameters()
    buffers = [b for _, b in engine.named_buffers()]
    fast = engine._channels_last_ok
    with torch.inference_mode(False), torch.enable_grad():
        if xs.is_inference():
            xs = xs.clone()
        if xs.dim() == 5 and fast:  # images (G, B, C, H, W) stored as (B, H, W, G, C): the
            # grouped convolution vmap makes of the first conv then reads a channels_last
            # (B, G*C, H, W) view, so its output (and the bias add, pooling) is channels_last
            xs = xs.permute(1, 3, 4, 0, 2).contiguous().permute(3, 0, 4, 1, 2)
        kept = [b.detach().clone() for b in buffers]   # restored after: episodes leave no trace
        # (G, ...) copies of the adapted parameters, named as in the _Call wrapper
        stacked = {f"engine.{n}": _stack(p, g, fast) for n, p in named}
        opt = _optimizer(engine, optimizer, list(stacked.values()), lr)
        loss_call, predict_call = _Call(engine, "_step_loss"), _Call(engine, "predict")

        def loss_fn(params: dict[str, torch.Tensor], x: torch.Tensor):
            pred, loss = functional_call(loss_call, params, (x,))
            return loss, pred

        def predict_fn(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return functional_call(predict_call, params, (x,))

        # randomness="same": a generator the loss draws from (TTT's rotations="rand") advances
        # once per step, as it does in each sequential episode (re-seeded per episode there)
        step_fn = vmap(grad_and_value(loss_fn, has_aux=True), randomness="same")
        engine._begin_adapt()
        if engine._wants_batch_start:
            engine._begin_batch({n: p.detach().clone() for n, p in named})
        logits, losses = [], []
        try:
            for _ in range(steps):
                with channel_pooling():
                    grads, (loss, pred) = step_fn(stacked, xs)  # loss (G,), pred (G, B, classes)
                for name, t in stacked.items():  # fused optimizers pair elements by memory
                    t.grad = _like(grads[name], t)  # position: the grad gets t's strides
                opt.step()
                logits.append(pred.detach())
                losses.append(loss.detach())
            with torch.no_grad(), channel_pooling():
                logits.append(vmap(predict_fn, randomness="same")(stacked, xs))
        finally:
            with torch.no_grad():
                for b, k in zip(buffers, kept):
                    b.copy_(k)
    losses_t = torch.stack(losses) if losses else logits[0].new_zeros(0, g)
    out = torch.stack(logits)                                           # (K+1, G, B, classes)
    return AdaptResult(logits=entropy_gate(out) if engine.config.gate == "entropy" else out,
                       losses=losses_t)


def augmented_copies(x: torch.Tensor, copies: int, seeds: Sequence[int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, copies, C, H, W): copy 0 of each image is the image itself, the
    others a random crop of it padded by max(1, round(H / 8)) zero pixels per side (4 at
    32x32, as the TTT release's RandomCrop(32, padding=4)) and flipped horizontally with
    probability 1/2. Image i's copies are drawn from a generator seeded with seeds[i], so they
    depend on neither the batch nor the device."""
    if x.dim() != 4:
        raise ValueError(f"augmented_copies needs images (B, C, H, W), got {tuple(x.shape)}")
    if copies < 1 or len(seeds) != x.shape[0]:
        raise ValueError(f"augmented_copies needs copies >= 1 and one seed per image, got "
                         f"copies={copies}, {len(seeds)} seeds for {x.shape[0]} images")
    b, c, h, w = x.shape
    pad = max(1, round(h / 8))
    offsets, flips = [], []
    for s in seeds:
        gen = torch.Generator().manual_seed(int(s))
        offsets.append(torch.randint(2 * pad + 1, (copies, 2), generator=gen))
        flips.append(torch.randint(2, (copies,), generator=gen).bool())
    off = torch.stack(offsets)                                        # (B, copies, 2)
    flip = torch.stack(flips)                                         # (B, copies)
    off[:, 0] = pad                                                   # copy 0: the image
    flip[:, 0] = False
    off, flip = off.to(x.device), flip.to(x.device)
    padded = nn.functional.pad(x, (pad, pad, pad, pad))              # (B, C, H+2p, W+2p)
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = off[..., 0, None] + ar_h                                   # (B, copies, H)
    cols = off[..., 1, None] + torch.where(flip[..., None], w - 1 - ar_w, ar_w)  # (B, copies, W)
    img = torch.arange(b, device=x.device)[:, None, None, None, None]
    chan = torch.arange(c, device=x.device)[None, None, :, None, None]
    return padded[img, chan, rows[:, :, None, :, None], cols[:, :, None, None, :]]


def adapt_per_sample(engine: Engine, x: torch.Tensor, copies: int, seeds: Sequence[int],
                     steps: int | None = None, lr: float | None = None, *,
                     optimizer: str | None = None, episodes: int = 1) -> AdaptResult:
    """Per-sample episodic TTT: each image of x (B, C, H, W) adapted alone on its `copies`
    augmented copies (`augmented_copies`), `episodes` images at a time. Returns logits
    (K+1, B, classes) — the prediction for each image itself (its copy 0) after every step —
    and losses (K, B), each image's loss over its copies. Equal for every `episodes` value
    within float tolerance."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    batches = augmented_copies(x, copies, seeds)                      # (B, copies, C, H, W)
    logits, losses = [], []
    for start in range(0, x.shape[0], episodes):
        r = adapt_episodes(engine, batches[start:start + episodes], steps, lr,
                           optimizer=optimizer)
        logits.append(r.logits[:, :, 0])                              # (K+1, g, classes)
        losses.append(r.losses)                                       # (K, g)
    return AdaptResult(logits=torch.cat(logits, 1), losses=torch.cat(losses, 1))
