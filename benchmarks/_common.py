"""Shared pieces of the engine benchmarks: the seeds' data protocol, joint training, and the
anytime evaluation (one `adapt` run per batch gives the accuracy after every step 0..K).

Protocol (the torch-ttt MNIST tutorials, on any dataset of `pipeline.datasets`):
the dataset's normalisation inside the model, unshuffled training, the test set corrupted with
`gaussian_noise` severity 5 (N(0, 2²) in normalised units, fixed corruption seed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

import engines
from pipeline.corruptions import corrupt
from pipeline.datasets import DatasetSpec, load_split, to_float
from pipeline.models import build_model

__all__ = ["MODEL_FOR", "Data", "apply_sets", "build_engine", "clean_accuracy", "evaluate", "load_data", "mean_sd", "train"]

MODEL_FOR = {"ttt": "seed_cnn", "it3": "seed_rescnn"}   # each method's seed network
CORRUPTION, SEVERITY, CORRUPTION_SEED = "gaussian_noise", 5, 0


@dataclass
class Data:
    spec: DatasetSpec
    x_train: torch.Tensor     # (N, 1, 28, 28) pixel units
    y_train: torch.Tensor     # (N,) int64
    x_test: torch.Tensor      # (M, 1, 28, 28) pixel units, corrupted
    y_test: torch.Tensor      # (M,) int64
    x_clean: torch.Tensor     # (M, 1, 28, 28) the same test images, clean


def load_data(dataset: str, data_dir: str | None = None, limit_train: int | None = None,
              limit_test: int | None = None, corruption: str = CORRUPTION,
              severity: int = SEVERITY) -> Data:
    """Train split, and the test split clean and with `corruption` at `severity` (default the
    seeds' gaussian_noise 5; other corruptions check that defaults hold beyond the one they
    were chosen on)."""
    train = load_split(dataset, "train", data_dir=data_dir)
    test = load_split(dataset, "test", data_dir=data_dir)
    n_tr, n_te = limit_train or len(train), limit_test or len(test)
    clean = to_float(test.images[:n_te])
    noisy = corrupt(clean, corruption, severity, np.arange(n_te), seed=CORRUPTION_SEED,
                    norm_std=test.spec.std[0])
    return Data(spec=train.spec,
                x_train=torch.from_numpy(to_float(train.images[:n_tr])),
                y_train=torch.from_numpy(train.labels[:n_tr]),
                x_test=torch.from_numpy(noisy), y_test=torch.from_numpy(test.labels[:n_te]),
                x_clean=torch.from_numpy(clean))


def build_engine(method: str, spec: DatasetSpec, seed: int,
                 config: engines.EngineConfig) -> engines.Engine:
    """A fresh seed network (init drawn from `seed`) wrapped in the method's engine."""
    torch.manual_seed(seed)
    model = build_model(MODEL_FOR[method], mean=spec.mean[0], std=spec.std[0],
                        num_classes=spec.num_classes)
    cls = engines.get_engine(method)
    return cls(model, torch.zeros(1, 1, 28, 28), config.replace(seed=seed))


def train(engine: engines.Engine, x: torch.Tensor, y: torch.Tensor, augment: str = "none",
          schedule: str = "none") -> dict:
    """Joint training with the config's recipe (Adam, unshuffled batches as in the seeds).

    `augment` (pipeline.training.augment: "cifar" = random crop with 4 px zero padding + flip)
    and `schedule` ("cosine": per batch from train_lr to 0) are the product trainer's recipe
    options; "none" for both is the seeds' recipe, bit for bit. Augmentation draws come from a
    generator seeded with the config's seed.
    """
    from pipeline.training.augment import augment_batch
    from pipeline.training.recipe import SCHEDULES, TrainRecipe, build_scheduler

    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r}: one of {', '.join(SCHEDULES)}")
    cfg = engine.config
    opt = torch.optim.Adam(engine.parameters(), lr=cfg.train_lr)
    sched = build_scheduler(opt, TrainRecipe(schedule=schedule),
                            cfg.train_epochs * -(-len(x) // cfg.train_batch_size))
    gen = torch.Generator().manual_seed(cfg.seed) if augment != "none" else None
    engine.train()
    t0, aux_sum, batches = time.perf_counter(), 0.0, 0
    for _ in range(cfg.train_epochs):
        correct = 0
        for i in range(0, len(x), cfg.train_batch_size):
            xb, yb = x[i:i + cfg.train_batch_size], y[i:i + cfg.train_batch_size]
            xb = augment_batch(xb, augment, gen)
            opt.zero_grad(set_to_none=True)
            loss, logits, aux = engine.joint_loss(xb, yb)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            correct += int((logits.argmax(1) == yb).sum())
            aux_sum, batches = aux_sum + float(aux.detach()), batches + 1
    engine.eval()
    return {"seconds": time.perf_counter() - t0,
            "last_epoch_train_acc": 100.0 * correct / max(len(x), 1),
            "mean_aux_loss": aux_sum / max(batches, 1)}


def evaluate(engine: engines.Engine, x: torch.Tensor, y: torch.Tensor, steps: int,
             lr: float | None = None, batch_size: int | None = None) -> np.ndarray:
    """Accuracy (%) after each step 0..steps, episodic adaptation per test batch."""
    engine.eval()
    bs = batch_size or engine.config.batch_size
    correct = torch.zeros(steps + 1, dtype=torch.long)
    for i in range(0, len(x), bs):
        result = engine.adapt(x[i:i + bs], steps=steps, lr=lr)
        correct += (result.logits.argmax(-1) == y[i:i + bs]).sum(1)
    return correct.double().numpy() * 100.0 / len(x)


def clean_accuracy(engine: engines.Engine, x: torch.Tensor, y: torch.Tensor) -> float:
    engine.eval()
    with torch.no_grad():
        pred = torch.cat([engine.predict(x[i:i + 1024]).argmax(1) for i in range(0, len(x), 1024)])
    return float((pred == y).double().mean() * 100)


def mean_sd(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    a = np.stack(rows)
    return a.mean(0), (a.std(0, ddof=1) if len(a) > 1 else np.zeros(a.shape[1]))


def _value(text: str):
    """A `--set` value: int, float, true/false, else the string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def apply_sets(config: engines.EngineConfig, items: list[str]) -> engines.EngineConfig:
    """`config` with each `--set KEY=VALUE` applied; keys that are not fields of this config
    are skipped (with `--method both`, a field of the other method)."""
    fields = set(type(config).__dataclass_fields__)
    changes = {}
    for item in items:
        key, _, value = item.partition("=")
        if key in fields:
            changes[key] = _value(value)
    return config.replace(**changes)
