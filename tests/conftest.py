"""Shared fixtures: tiny synthetic datasets as real IDX files, and no network in tests.

- ``idx_dir``: a folder with both datasets, each a valid ``--data-dir``/``data_dir``:
  ``idx_dir / "mnist"`` (gzipped files) and ``idx_dir / "fashion-mnist"`` (raw files), each
  with 64 train and 32 test seven-segment digit images (labels 0..9, learnable by a tiny CNN).
  ``idx_dir`` itself also works as a data root (``<root>/<dataset name>/`` is searched).
- ``shard_dir``: shards made by ``make_shards`` from ``idx_dir``'s mnist test split:
  identity (severity 0) and gaussian_noise severity 5, 16 samples per shard -> 4 files.
- Every test runs with ``TTT_PIPE_OFFLINE=1`` so nothing tries to download a dataset.
"""

from __future__ import annotations

import os

# MKL picks its CPU code path per process; on some CPUs that changes the last bits of a
# backward pass and, through Adam's near-sign first step, predictions. Pin it before torch
# loads MKL so in-process comparisons are reproducible (the adapt actors get it via Ray).
os.environ.setdefault("MKL_CBWR", "AUTO")

import pytest  # noqa: E402
from helpers import write_dataset


@pytest.fixture(autouse=True, scope="session")
def _offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TTT_PIPE_OFFLINE", "1")
        yield


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("idx")
    write_dataset(root / "mnist", n_train=64, n_test=32, gz=True, seed=0)
    write_dataset(root / "fashion-mnist", n_train=64, n_test=32, gz=False, seed=10)
    return root


@pytest.fixture(scope="session")
def shard_dir(idx_dir, tmp_path_factory):
    from pipeline.shard_maker import make_shards

    out = tmp_path_factory.mktemp("shards")
    make_shards("mnist", str(out), "gaussian_noise", "5", data_dir=idx_dir / "mnist",
                shard_size=16, seed=0)
    return out
