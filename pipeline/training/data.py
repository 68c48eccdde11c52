"""The train split as one uint8 tensor, served in batches that keep the device busy.

`Batches` holds the images as uint8 (N, C, H, W) and turns a batch into float pixel units
(uint8 / 255, bit-identical to `pipeline.datasets.to_float`) on the training device:

- resident (CPU, or a GPU the split fits on): the uint8 tensor lives on the device; a batch is
  an index into it — no host transfer at all after setup;
- staged (a GPU too small for the split): the uint8 tensor stays in pinned host memory; batch
  b+1 is gathered and copied with ``non_blocking=True`` while batch b trains (two pinned
  buffers, a CUDA event guards their reuse).
Neither mode reads a device value back to the host.
"""

from __future__ import annotations

import torch

__all__ = ["split_train_val", "Batches", "RESIDENT_SHARE"]

RESIDENT_SHARE = 0.25  # a GPU holds the uint8 split if it takes at most this share of free memory
_VAL_SEED_OFFSET = 0x5EED  # the held-out rows use their own generator: the shuffle is unchanged


def split_train_val(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, validation rows), int64; seeded; fraction 0 -> (arange(n), empty)."""
    if fraction <= 0:
        return torch.arange(n), torch.zeros(0, dtype=torch.int64)
    n_val = max(1, int(n * fraction))
    if n_val >= n:
        from pipeline.errors import TTTPipeError

        raise TTTPipeError(f"--val-fraction {fraction:g} leaves no training samples out of {n}; "
                           "lower it or train on more samples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + _VAL_SEED_OFFSET))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


class Batches:
    """Batches of (float pixel units, int64 labels) on `device` from uint8 images."""

    def __init__(self, images_u8: torch.Tensor, labels: torch.Tensor, device: torch.device,
                 staged: bool | None = None):
        if images_u8.dtype != torch.uint8 or images_u8.ndim != 4:
            raise ValueError(f"Batches wants uint8 images (N, C, H, W), got {images_u8.dtype} "
                             f"{tuple(images_u8.shape)}")
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        if staged is None:
            staged = cuda and not _fits(images_u8, self.device)
        self.staged = staged
        if staged:
            self.images = images_u8.pin_memory() if cuda else images_u8
            self.labels = labels.pin_memory() if cuda else labels
        else:
            self.images = images_u8.to(self.device)
            self.labels = labels.to(self.device)
        self._pending = None  # (order, b, x, y, event) of the prefetched batch
        self._buffers: list = [None, None]
        self._slot = 0

    @property
    def index_device(self) -> torch.device:
        """Where batch indices must live (the images' device)."""
        return self.images.device

    def __len__(self) -> int:
        return len(self.labels)

    def _gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.staged:
            return self.images[idx], self.labels[idx]
        cuda = self.device.type == "cuda"
        slot = self._slot
        self._slot ^= 1
        buf = self._buffers[slot]
        if buf is not None and buf[2] is not None:
            buf[2].synchronize()  # the copy out of this buffer (two batches ago) has finished
        shape = (len(idx), *self.images.shape[1:])
        if buf is None or buf[0].shape != shape:
            xb = torch.empty(shape, dtype=torch.uint8, pin_memory=cuda)
            yb = torch.empty(len(idx), dtype=torch.int64, pin_memory=cuda)
        else:
            xb, yb = buf[0], buf[1]
        torch.index_select(self.images, 0, idx, out=xb)
        torch.index_select(self.labels, 0, idx, out=yb)
        x = xb.to(self.device, non_blocking=True)
        y = yb.to(self.device, non_blocking=True)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        self._buffers[slot] = (xb, yb, event)
        return x, y

    def batch(self, order: torch.Tensor, b: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `b` of the epoch's `order` (indices on `index_device`); prefetches batch b+1."""
        pending = self._pending
        if pending is not None and pending[0] is order and pending[1] == b:
            x, y = pending[2], pending[3]
        else:
            x, y = self._gather(order[b * batch_size:(b + 1) * batch_size])
        self._pending = None
        if self.staged and (b + 1) * batch_size < len(order):
            nx, ny = self._gather(order[(b + 1) * batch_size:(b + 2) * batch_size])
            self._pending = (order, b + 1, nx, ny)
        return to_pixels(x), y


def to_pixels(x_u8: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 / 255 (the same values as `pipeline.datasets.to_float`)."""
    return x_u8.to(torch.float32) / 255.0


def _fits(images_u8: torch.Tensor, device: torch.device) -> bool:
    free, _ = torch.cuda.mem_get_info(device)
    return images_u8.numel() <= RESIDENT_SHARE * free
