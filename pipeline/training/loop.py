"""Epochs of joint training over `Batches`, in chunks, with a resumable state.

`EpochLoop.run(max_batches)` trains up to `max_batches` batches and stops at the end of an
epoch; at the end of an epoch it reads the epoch's sums from the device once, validates on the
held-out rows and returns the epoch's metrics. No other device value is read on the host
(loss, aux loss and correct counts accumulate on the device).

`state_dict()` (between epochs) holds the engine, optimizer, scheduler, grad scaler, the
shuffle/augmentation/global RNG states, the epoch and the metrics so far; `load_state_dict`
continues from it with bit-identical results (same thread count, same device).

Data parallel (jobs/train_parallel.py): `rank`/`world_size` make the loop train on
`order[rank::world_size]` of the same seeded permutation (pipeline/training/parallel.py),
`forward` is the call that computes `(loss, logits, aux_loss)` (a DDP-wrapped `JointLoss`), and
`all_reduce` (sums a tensor across the ranks in place) makes the epoch's metrics global. The
defaults (rank 0 of 1, `engine.joint_loss`, no all-reduce) are the single-worker loop.

`frozen` modules (e.g. the model under `--train aux`) stay in eval mode whenever the engine
trains: their BatchNorm running statistics are not updated and dropout is off, so a module whose
parameters also have `requires_grad=False` leaves training bit-identical. Eval mode is also the
mode adaptation runs the model in (jobs/shard_worker.py), so an auxiliary part trained on a
frozen model sees the features it will see at test time.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

import torch

from pipeline.errors import TTTPipeError
from pipeline.training.augment import augment_batch
from pipeline.training.data import Batches
from pipeline.training.parallel import check_even_shards, shard_batches, shard_rows
from pipeline.training.recipe import TrainRecipe, autocast_dtype, build_optimizer, build_scheduler

__all__ = ["EpochLoop"]

_AUG_SEED_OFFSET = 0xA06  # the augmentation's generator: separate from the shuffle's


class EpochLoop:
    """Train `engine` (its `joint_loss`) for `epochs` epochs of `train` batches."""

    def __init__(self, engine: torch.nn.Module, recipe: TrainRecipe, train: Batches,
                 val: Batches | None, *, epochs: int, batch_size: int, seed: int,
                 frozen: tuple[torch.nn.Module, ...] = (), rank: int = 0, world_size: int = 1,
                 forward: Callable | None = None,
                 all_reduce: Callable[[torch.Tensor], None] | None = None):
        self.engine, self.recipe, self.train, self.val = engine, recipe, train, val
        self.rank, self.world_size, self.all_reduce = rank, world_size, all_reduce
        self.forward = forward or engine.joint_loss
        self.frozen = tuple(frozen)
        self.epochs, self.batch_size = epochs, batch_size
        self.device = train.device
        if world_size > 1:
            check_even_shards(len(train), world_size, batch_size)
        self.batches_per_epoch = shard_batches(len(train), rank, world_size, batch_size)
        # only what trains: a caller freezing a part (requires_grad False) leaves it out
        trainable = [p for p in engine.parameters() if p.requires_grad]
        if not trainable:
            raise TTTPipeError("nothing to train: every parameter is frozen")
        self.optimizer = build_optimizer(trainable, recipe)
        self.scheduler = build_scheduler(self.optimizer, recipe, epochs * self.batches_per_epoch)
        self.amp_dtype = autocast_dtype(recipe.precision)
        if recipe.precision == "fp16" and self.device.type != "cuda":
            raise TTTPipeError("--precision fp16 needs a CUDA GPU (its GradScaler); "
                               "use --precision bf16 on the CPU")
        self.scaler = torch.amp.GradScaler("cuda") if recipe.precision == "fp16" else None
        self.shuffle = torch.Generator().manual_seed(seed)
        self.aug = None
        if recipe.augment != "none":
            self.aug = torch.Generator(device=self.device).manual_seed(seed + _AUG_SEED_OFFSET)
        self.epoch, self.batch, self.metrics = 0, 0, []
        self.seconds = 0.0  # training time of the finished epochs (kept across a resume)
        self._sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, aux, correct
        self._epoch_started = None
        self.order = None

    @property
    def finished(self) -> bool:
        return self.epoch >= self.epochs

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def run(self, max_batches: int) -> dict:
        """Train up to `max_batches` batches of the current epoch; report where it stands."""
        if self.finished:
            raise RuntimeError("training already finished")
        n, bs = len(self.train), self.batch_size
        if self.batch == 0:
            order = torch.randperm(n, generator=self.shuffle)
            self.order = shard_rows(order, self.rank, self.world_size).to(self.train.index_device)
            self._sums.zero_()
            self._epoch_started = time.perf_counter()
            self._train_mode()
        stop = min(self.batch + max_batches, self.batches_per_epoch)
        for b in range(self.batch, stop):
            x, y = self.train.batch(self.order, b, bs)
            x = augment_batch(x, self.recipe.augment, self.aug)
            with self._autocast():
                loss, logits, aux_loss = self.forward(x, y)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            with torch.no_grad():  # sums stay on the device: no host round trip per batch
                self._sums += torch.stack([loss.detach().double() * len(y),
                                           aux_loss.detach().double() * len(y),
                                           (logits.argmax(1) == y).sum().double()])
        self.batch = stop
        report = {"epoch": self.epoch + 1, "batches_done": self.batch,
                  "batches_per_epoch": self.batches_per_epoch, "epoch_metrics": None,
                  "finished": False}
        if self.batch == self.batches_per_epoch:
            report.update(epoch_metrics=self._end_epoch(), finished=self.finished)
        return report

    def _end_epoch(self) -> dict:
        n = len(self.train)  # all ranks' rows: the sums are all-reduced first
        if self.all_reduce is not None:
            self.all_reduce(self._sums)
        loss, aux, correct = (v / n for v in self._sums.tolist())  # the epoch's one read
        if not math.isfinite(loss):
            raise TTTPipeError(f"training diverged (loss is {loss}) in epoch {self.epoch + 1}; "
                               "lower --lr or --aux-weight")
        seconds = time.perf_counter() - self._epoch_started
        self.seconds += seconds
        self.epoch, self.batch = self.epoch + 1, 0
        metrics = {"epoch": self.epoch, "loss": loss, "accuracy": correct, "aux_loss": aux,
                   "lr": self.optimizer.param_groups[0]["lr"], "seconds": round(seconds, 3),
                   "images_per_s": round(n / seconds, 1) if seconds > 0 else None}
        if self.val is not None and len(self.val):
            metrics["val_accuracy"] = self.validate()
        self.metrics.append(metrics)
        return metrics

    @torch.no_grad()
    def validate(self) -> float:
        """Top-1 accuracy of the main prediction on the held-out rows (eval mode, no augmentation)."""
        was_training = self.engine.training
        self.engine.eval()
        order = torch.arange(len(self.val), device=self.val.index_device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        bs = max(self.batch_size, 256)
        try:
            for b in range(math.ceil(len(self.val) / bs)):
                x, y = self.val.batch(order, b, bs)
                with self._autocast():
                    logits = self.engine.predict(x)
                correct += (logits.argmax(1) == y).sum()
        finally:
            if was_training:
                self._train_mode()
        return correct.item() / len(self.val)

    def _train_mode(self) -> None:
        """The engine in train mode, the frozen modules in eval mode."""
        self.engine.train()
        for module in self.frozen:
            module.eval()

    # -- resumable state ------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.batch != 0:
            raise RuntimeError("state_dict() is taken between epochs")
        state = {"epoch": self.epoch, "metrics": self.metrics, "seconds": self.seconds,
                 "engine": self.engine.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "shuffle": self.shuffle.get_state(), "torch_rng": torch.get_rng_state()}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.aug is not None:
            state["aug"] = self.aug.get_state()
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.engine.load_state_dict(state["engine"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.aug is not None:
            self.aug.set_state(state["aug"])
        self.shuffle.set_state(state["shuffle"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.epoch, self.batch = int(state["epoch"]), 0
        self.metrics, self.seconds = list(state["metrics"]), float(state["seconds"])
