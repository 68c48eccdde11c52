"""Frozen configs for the engines: the layer, the joint-training weight, training defaults and
test-time defaults. They round-trip through JSON (`to_dict`/`from_dict`) for checkpoints."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["ADAPT_PARAMS", "MODES", "OPTIMIZERS", "EngineConfig", "IT3Config", "TTTConfig"]

ADAPT_PARAMS = ("all", "encoder", "model", "norm")
OPTIMIZERS = ("adam", "sgd")
MODES = ("episodic", "online")


@dataclass(frozen=True)
class EngineConfig:
    """Fields every engine shares.

    layer: the named submodule the auxiliary part attaches to.
    aux_weight: joint loss = CE + aux_weight * aux_loss.
    adapt_params: which parameters test-time adaptation changes —
        "model" every model parameter (torch-ttt's choice); "encoder" the model's modules run
        up to and including `layer`; "norm" the affine parameters of normalisation layers;
        "all" the model plus the auxiliary head/embedder.
    steps, lr, optimizer ("adam" | "sgd" with momentum 0.9), batch_size, mode
    ("episodic": weights and optimizer state restored after every batch; "online": carried
    over until `reset()`): test-time defaults.
    seed: seeds the auxiliary part's initial weights.
    channels_last: the first `adapt()` stores the 4-D (conv) weights of the model and the
        auxiliary part in channels_last memory format (in place, values unchanged): oneDNN
        convolutions and max-pooling then run ~1.3-1.6x faster on CPU. False: layout untouched.
    train_epochs, train_batch_size, train_lr: joint-training defaults (Adam).
    """

    layer: str = ""
    aux_weight: float = 1.0
    adapt_params: str = "model"
    steps: int = 1
    lr: float = 1e-3
    optimizer: str = "adam"
    batch_size: int = 32
    mode: str = "episodic"
    seed: int = 0
    channels_last: bool = True
    train_epochs: int = 1
    train_batch_size: int = 64
    train_lr: float = 1e-3

    choices: ClassVar[dict[str, tuple[str, ...]]] = {
        "adapt_params": ADAPT_PARAMS, "optimizer": OPTIMIZERS, "mode": MODES}

    def __post_init__(self) -> None:
        name = type(self).__name__
        for f in dataclasses.fields(self):
            value, default = getattr(self, f.name), f.default
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
            elif type(value) is not type(default):
                raise ValueError(f"{name}.{f.name} must be a {type(default).__name__}, "
                                 f"got {value!r}")
        for field_name, allowed in self.choices.items():
            if getattr(self, field_name) not in allowed:
                raise ValueError(f"unknown {field_name} {getattr(self, field_name)!r}; "
                                 f"choose from: {', '.join(sorted(allowed))}")
        if self.steps < 0 or self.batch_size < 1 or self.train_epochs < 0 \
                or self.train_batch_size < 1:
            raise ValueError(f"{name}: steps and train_epochs must be >= 0, batch sizes >= 1")
        if not (self.lr > 0 and self.train_lr > 0 and self.aux_weight >= 0):
            raise ValueError(f"{name}: lr and train_lr must be > 0 and aux_weight >= 0")
        if not self.layer:
            raise ValueError(f"{name}.layer is empty; name the layer to attach to, e.g. 'fc2'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineConfig:
        """Inverse of `to_dict`; missing keys take the defaults, unknown keys are an error."""
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} key(s) {', '.join(unknown)}; "
                             f"choose from: {', '.join(sorted(valid))}")
        return cls(**data)

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class TTTConfig(EngineConfig):
    """Rotation TTT. Defaults follow the torch-ttt MNIST tutorial (fc2, weight 0.35, Adam 1e-2,
    1 epoch of batch 64; 3 test steps of Adam 1e-2 on batches of 32).

    rotations: the test-time rotation loss — "all" (each image at 0/90/180/270 degrees, 4B per
        step, as torch-ttt) or "rand" (one random angle per image, drawn from `seed` anew at
        every `adapt` call, as the official TTT release's rotate_batch(x, 'rand'): B per step
        plus a no-grad B forward for the prediction). Joint training always uses "all".
    """

    layer: str = "fc2"
    aux_weight: float = 0.35
    steps: int = 3
    lr: float = 1e-2
    batch_size: int = 32
    train_epochs: int = 1
    train_batch_size: int = 64
    train_lr: float = 1e-2
    rotations: str = "all"

    choices: ClassVar[dict[str, tuple[str, ...]]] = {
        **EngineConfig.choices, "rotations": ("all", "rand")}


@dataclass(frozen=True)
class IT3Config(EngineConfig):
    """IT3 (idempotent TTT). Defaults follow the torch-ttt IT3 tutorial (conv1, 2 epochs of
    batch 256 at Adam 1e-3; 1 test step of Adam 1e-3 on batches of 256).

    variant: "paper" — y0 = f(x, null), y1 = F(x, y0) with F frozen at the batch's start;
        "torch_ttt" — pass 1 without injection, pass 2 injects embed(y0), both with gradients,
        no frozen copy (reproduces the tutorial; `null` is ignored).
    distance: between softmax outputs — "dot" (the tutorial's -(p*q).sum(1).mean()), "mse",
        "cosine" (1 - cosine similarity), "js" (Jensen-Shannon).
    null: the "no label" signal of the paper variant — "zeros", "uniform" (1/C), "learned"
        (a trained vector, zero-initialised) or "none" (no injection at all).
    detach_target: stop the gradient through y0 where it is the regression target.
    embedder: "channel" adds a (B, C_feat) vector broadcast over space (torch-ttt's choice);
        "full" maps the signal to the layer's whole feature shape.
    """

    layer: str = "conv1"
    aux_weight: float = 1.0
    variant: str = "paper"
    distance: str = "dot"
    null: str = "zeros"
    detach_target: bool = False
    embedder: str = "channel"
    steps: int = 1
    lr: float = 1e-3
    batch_size: int = 256
    train_epochs: int = 2
    train_batch_size: int = 256
    train_lr: float = 1e-3

    choices: ClassVar[dict[str, tuple[str, ...]]] = {
        **EngineConfig.choices,
        "variant": ("paper", "torch_ttt"),
        "distance": ("cosine", "dot", "js", "mse"),
        "null": ("learned", "none", "uniform", "zeros"),
        "embedder": ("channel", "full"),
    }
