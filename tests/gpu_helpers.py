"""What the GPU tests share: the device they run on and the skip that keeps them off CPU-only
machines.

On a CUDA machine `DEVICE` is cuda:0 and every test marked `needs_gpu` runs (scripts/gpu_check.sh
runs them all and fails if one is skipped). `TTT_PIPE_GPU_DRY_RUN=1` (`scripts/gpu_check.sh
--dry-run`) runs the same tests on the CPU: that checks the tests' own code and the GPU code
paths' plumbing (devices passed explicitly, pinned/staged batches, logical GPUs in Ray) on a
machine without a GPU; it says nothing about CUDA numerics.
"""

from __future__ import annotations

import os

import pytest
import torch

__all__ = ["DEVICE", "DRY_RUN", "HAVE_CUDA", "needs_gpu"]

HAVE_CUDA = torch.cuda.is_available()
DRY_RUN = os.environ.get("TTT_PIPE_GPU_DRY_RUN") == "1" and not HAVE_CUDA
DEVICE = torch.device("cuda", 0) if HAVE_CUDA else torch.device("cpu")

needs_gpu = pytest.mark.skipif(not (HAVE_CUDA or DRY_RUN),
                               reason="needs a GPU (TTT_PIPE_GPU_DRY_RUN=1 runs it on the CPU)")
