"""Data-parallel pieces of the training loop, without Ray (jobs/train_parallel.py injects Ray Train).

- `JointLoss`: the engine (model + the method's auxiliary part) as ONE `nn.Module` whose
  `forward(x, y)` is `engine.joint_loss(x, y)`, so a DistributedDataParallel wrapper sees (and
  all-reduces the gradients of) every trainable parameter.
- `shard_rows(order, rank, world_size)`: rank r's share of an epoch's permutation, `order[r::N]`;
  the union over the ranks is the whole single-worker epoch, the shares are disjoint.
- `check_even_shards`: DDP needs every rank to run the same number of batches.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.errors import TTTPipeError

__all__ = ["JointLoss", "shard_rows", "shard_batches", "check_even_shards"]


class JointLoss(nn.Module):
    """`forward(x, y) -> (loss, logits, aux_loss)` of `engine.joint_loss` (parameters shared)."""

    def __init__(self, engine: nn.Module):
        super().__init__()
        self.engine = engine

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return self.engine.joint_loss(x, y)


def shard_rows(order: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s disjoint share of the epoch's permutation: `order[rank::world_size]`."""
    return order if world_size == 1 else order[rank::world_size]


def shard_batches(n: int, rank: int, world_size: int, batch_size: int) -> int:
    """Batches rank `rank` runs per epoch over its share of `n` rows."""
    return math.ceil(len(range(rank, n, world_size)) / batch_size)


def check_even_shards(n: int, world_size: int, batch_size: int) -> None:
    """One-line error when the ranks would run different batch counts (DDP would hang)."""
    counts = {shard_batches(n, r, world_size, batch_size) for r in range(world_size)}
    if len(counts) > 1 or 0 in counts:
        raise TTTPipeError(f"{n} training samples over {world_size} workers at batch size "
                           f"{batch_size} give the workers different batch counts ({sorted(counts)}); "
                           "change --limit, --batch-size or --workers")
