"""IT3 (Durasov et al. 2025): idempotent test-time training.

The model gets a second input, a signal y over the classes: an embedder maps y to the named
layer's feature shape and adds it there (a forward hook alive only inside the call).
Training makes f(x, hint) return y and f(x, null) predict y; the hint is onehot(y) (the paper)
or, per row, a random class (`hint_wrong`) or the model's own detached prediction, optionally
for a pixel-dropped x (`hint_self`, `hint_dropout`; the default). At test time, with
y0 = f(x, null) and F the weights frozen at the batch's start (no copy of the module: the
per-batch snapshot tensors through `torch.func.functional_call`), adaptation minimises
dist(F(x, y0), y0) — the model is pushed towards idempotence on the test batch.
`variant="torch_ttt"` is the torch-ttt tutorial instead: y0 = f(x) without injection,
y1 = f(x, y0) with the live weights, both passes with gradients.
With `split_model` the two passes of a test step share the part of the model before the layer
(engines/split.py): computed once per step (torch_ttt) or, for the frozen anchor, once per batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from engines.base import Engine, register_engine
from engines.config import IT3Config
from engines.hooks import DryRun, add_to_output, build_seeded
from engines.split import LayerSplit, tensor_slots

__all__ = ["DISTANCES", "IT3Engine", "label_embedder"]


def _dot(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return -(p * q).sum(1).mean()  # the tutorial's distance


def _cosine(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(p, q, dim=1)).mean()


def _js(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    # logs of clamped probabilities: finite gradients when a softmax underflows to 0
    log_m = (0.5 * (p + q)).clamp_min(eps).log()
    kl_pm = p * (p.clamp_min(eps).log() - log_m)
    kl_qm = q * (q.clamp_min(eps).log() - log_m)
    return 0.5 * (kl_pm + kl_qm).sum(1).mean()


DISTANCES = {"cosine": _cosine, "dot": _dot, "js": _js, "mse": F.mse_loss}


def label_embedder(num_classes: int, feature_shape: torch.Size, kind: str) -> nn.Module:
    """torch-ttt's embedder Linear(C, c)-LeakyReLU-Linear(c, c)-LeakyReLU, c = feature channels
    ("channel": added per channel, broadcast over space), or with a last layer the size of the
    whole feature map ("full")."""
    c = feature_shape[0]
    if kind == "channel" or len(feature_shape) == 1:
        return nn.Sequential(nn.Linear(num_classes, c), nn.LeakyReLU(),
                             nn.Linear(c, c), nn.LeakyReLU())
    return nn.Sequential(nn.Linear(num_classes, c), nn.LeakyReLU(),
                         nn.Linear(c, math.prod(feature_shape)), nn.LeakyReLU(),
                         nn.Unflatten(1, tuple(feature_shape)))


@register_engine("it3")
class IT3Engine(Engine):
    """IT3. `embedder` maps a class signal (B, C) into `config.layer`'s features;
    `null_signal` exists only with null="learned".

    Adapted parameters (`adapt_params`): "model" (default), "encoder" (up to the layer),
    "all" (+ embedder and learned null), "norm". `training_loss(x, y)` needs y: int labels
    (B,) or a float signal (B, C) such as one-hot targets (torch-ttt's `target=`).
    """

    config_cls = IT3Config
    config: IT3Config

    def _build_aux(self, probe: DryRun, generator: torch.Generator,
                   device: torch.device, dtype: torch.dtype) -> None:
        self.num_classes = probe.logits.shape[1]
        shape = probe.features.shape[1:]
        self.embedder = build_seeded(
            lambda: label_embedder(self.num_classes, shape, self.config.embedder),
            generator, device, dtype)
        if self.config.null == "learned":
            self.null_signal = nn.Parameter(torch.zeros(self.num_classes, device=device,
                                                        dtype=dtype))
        self._paper = self.config.variant == "paper"
        self._wants_batch_start = self._paper  # the frozen anchor F
        self._distance = DISTANCES[self.config.distance]
        self._train_distance = DISTANCES[self.config.train_distance or self.config.distance]
        self._anchor_model: dict[str, torch.Tensor] = {}
        self._anchor_embedder: dict[str, torch.Tensor] = {}
        self._anchor_cut: tuple[torch.Tensor, ...] | None = None  # F's prefix values, per batch
        self._split.channel_delta = self.config.embedder == "channel"  # max-pool move allowed

    # -- the conditioned forward -----------------------------------------------------------
    def _null_embedding(self, x: torch.Tensor) -> torch.Tensor | None:
        """embed(null) for each of the B rows, or None for "no injection"."""
        null = self.config.null
        if not self._paper or null == "none":
            return None
        if null == "learned":
            signal = self.null_signal[None]
        else:
            value = 0.0 if null == "zeros" else 1.0 / self.num_classes
            signal = x.new_full((1, self.num_classes), value)
        emb = self.embedder(signal)                                    # (1, *emb_shape)
        return emb.expand(x.shape[0], *emb.shape[1:])                  # (B, *emb_shape)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor | None,
                 params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """model(x) with `emb` added to the layer's output; with `params`, the model's weights
        are replaced by those tensors for this call only."""
        def run() -> torch.Tensor:  # params name each tensor slot once (tensor_slots)
            return (self.model(x) if params is None
                    else functional_call(self.model, params, (x,), tie_weights=False))
        if emb is None:
            return run()
        with add_to_output(self.model.get_submodule(self.layer_name), emb):
            return run()

    def _target(self, y: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        if y is None:
            raise ValueError("IT3 training needs labels: training_loss(x, y) or engine(x, target=y)")
        if y.is_floating_point() and y.dim() == 2:
            return y.to(x.dtype)                                       # a signal (B, C)
        return F.one_hot(y.long(), self.num_classes).to(x.dtype)        # (B, C)

    # -- training --------------------------------------------------------------------------
    def _training_hint(self, target: torch.Tensor, p0: torch.Tensor | None) -> torch.Tensor:
        """The hint-branch signal (B, C): per row the target, or with probability `hint_wrong`
        a uniformly random class's one-hot, or with probability `hint_self` the detached null
        prediction p0 (the loss still asks for the target)."""
        cfg = self.config
        if cfg.hint_wrong <= 0 and cfg.hint_self <= 0:
            return target
        b = target.shape[0]
        u = torch.rand(b, 1, device=target.device)
        hint = target
        if cfg.hint_wrong > 0:
            wrong = torch.randint(self.num_classes, (b,), device=target.device)
            rand_oh = F.one_hot(wrong, self.num_classes).to(target.dtype)
            hint = torch.where(u < cfg.hint_wrong, rand_oh, hint)
        if p0 is not None:
            lo = cfg.hint_wrong
            hint = torch.where((u >= lo) & (u < lo + cfg.hint_self), p0.detach(), hint)
        return hint

    def _hint_input(self, x: torch.Tensor) -> torch.Tensor:
        """The copy of x (B, ...) the self hint is predicted from: each row shifted by a random
        integer offset in [-hint_shift, hint_shift] per axis (zero fill; images (B, C, H, W)),
        then a fraction of its pixels zeroed — hint_dropout, or per row uniform in
        [0, hint_dropout] with hint_dropout_mode="uniform". x itself when neither applies."""
        cfg = self.config
        if cfg.hint_shift > 0:
            b, _, h, w = x.shape
            d = torch.randint(-cfg.hint_shift, cfg.hint_shift + 1, (b, 2), device=x.device)
            theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
            theta[:, 0, 0] = theta[:, 1, 1] = 1.0
            theta[:, 0, 2] = -2.0 * d[:, 0].to(x.dtype) / w   # output(i) = input(i - d)
            theta[:, 1, 2] = -2.0 * d[:, 1].to(x.dtype) / h
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros",
                              align_corners=False)
        if cfg.hint_dropout > 0:
            level: float | torch.Tensor = cfg.hint_dropout
            if cfg.hint_dropout_mode == "uniform":
                level = cfg.hint_dropout * torch.rand(x.shape[0], *[1] * (x.dim() - 1),
                                                      device=x.device, dtype=x.dtype)
            x = x * (torch.rand_like(x) >= level)
        return x

    def training_loss(self, x: torch.Tensor, y: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(x, null) logits, dist(softmax f(x, hint), y)); hint = y unless `hint_wrong` /
        `hint_self` replace rows. One forward over [x; x] (2B), or two of B with hint_self
        (the hint needs the null pass first)."""
        target = self._target(y, x)
        emb_null = self._null_embedding(x)
        b = x.shape[0]
        if self.config.hint_self > 0:
            logits = self._forward(x, emb_null)                        # (B, C)
            p_hint = logits.softmax(1)
            x_hint = self._hint_input(x)
            if x_hint is not x:  # the hint from a pixel-dropped / shifted copy of x
                with torch.no_grad():
                    p_hint = self._forward(x_hint, emb_null).softmax(1)
            hint = self._training_hint(target, p_hint)
            logits_hint = self._forward(x, self.embedder(hint))
        else:
            emb_y = self.embedder(self._training_hint(target, None))   # (B, *emb_shape)
            if emb_null is None:
                emb_null = torch.zeros_like(emb_y)                      # no injection
            both = self._forward(torch.cat([x, x]), torch.cat([emb_null, emb_y]))  # (2B, C)
            logits, logits_hint = both[:b], both[b:]
        aux_loss = self._train_distance(logits_hint.softmax(1), target)
        return logits, aux_loss

    # -- test time -------------------------------------------------------------------------
    def _begin_batch(self, start: dict[str, torch.Tensor]) -> None:
        anchor = {id(p): start[f"model.{n}"] for n, p in self.model.named_parameters()
                  if f"model.{n}" in start}
        # by slot: a weight tied into two modules needs the anchor in both (tensor_slots)
        self._anchor_model = {n: anchor[id(p)] for n, p in tensor_slots(self.model).items()
                              if id(p) in anchor}
        self._anchor_embedder = {n[len("embedder."):]: t for n, t in start.items()
                                 if n.startswith("embedder.")}
        self._anchor_cut = None

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, self._null_embedding(x))

    def _step_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        split = self._split_for(x)
        logits0, p0, logits1 = self._passes(x) if split is None else self._split_passes(split, x)
        target = p0.detach() if self.config.detach_target else p0
        return logits0, self._distance(logits1.softmax(1), target)

    def _passes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits of f(x, null), its softmax p0, logits of the second pass on p0)."""
        logits0 = self.predict(x)                                      # f(x, null), (B, C)
        p0 = logits0.softmax(1)
        if self._paper:   # y1 = F(x, y0), F frozen at the batch's start
            emb = functional_call(self.embedder, self._anchor_embedder, (p0,))
            return logits0, p0, self._forward(x, emb, params=self._anchor_model)
        return logits0, p0, self._forward(x, self.embedder(p0))       # torch-ttt: live weights

    def _split_passes(self, split: LayerSplit, x: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`_passes` with the model's prefix run once: the same values."""
        cut = split.cut(x)                                             # live prefix, with grad
        if self._paper:
            logits0 = split.run(cut, self._null_embedding(x))
            p0 = logits0.softmax(1)
            if self._anchor_cut is None:  # first step of the batch: live weights == F
                self._anchor_cut = tuple(c.detach() if isinstance(c, torch.Tensor) else c
                                         for c in cut)
            emb = functional_call(self.embedder, self._anchor_embedder, (p0,))
            return logits0, p0, split.run(self._anchor_cut, emb, params=self._anchor_model)
        logits0 = split.run(cut, None)
        p0 = logits0.softmax(1)
        return logits0, p0, split.run(cut, self.embedder(p0))
