"""Helpers for the `ttt-pipe adapt` tests: a tiny checkpoint trained in-process (no Ray).

Import the fixtures into a test module (`from adapt_fixtures import ttt_checkpoint`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

__all__ = ["train_tiny_checkpoint", "ttt_checkpoint", "read_predictions", "listing",
           "copy_shards"]

BATCH = 6  # does not divide the 16-sample shards: batches of 6, 6, 4


def train_tiny_checkpoint(out: Path, idx_root: Path, method: str = "ttt", epochs: int = 3,
                          preset: str | None = None, **config) -> str:
    """Train seed_cnn jointly with `method` for a few epochs on the synthetic mnist; save it.
    `preset` starts the config from the method's named preset instead of its defaults."""
    import engines
    from pipeline.checkpoint import save_checkpoint
    from pipeline.datasets import load_split, to_float
    from pipeline.models import build_model

    split = load_split("mnist", "train", data_dir=idx_root / "mnist")
    torch.manual_seed(0)
    model = build_model("seed_cnn", mean=split.spec.mean[0], std=split.spec.std[0])
    cls = engines.get_engine(method)
    changes = {"steps": 2, "lr": 1e-2, "batch_size": BATCH, **config}
    cfg = cls.config_cls.preset(preset, **changes) if preset else cls.config_cls(**changes)
    engine = cls(model, torch.zeros(1, 1, 28, 28), cfg)
    x = torch.from_numpy(to_float(split.images))
    y = torch.from_numpy(split.labels)
    opt = torch.optim.Adam(engine.parameters(), lr=1e-2)
    engine.train()
    for _ in range(epochs):
        for start in range(0, len(x), 16):
            loss, _, _ = engine.joint_loss(x[start:start + 16], y[start:start + 16])
            opt.zero_grad()
            loss.backward()
            opt.step()
    engine.eval()
    manifest = {
        "model": {"name": "seed_cnn", "kwargs": {"mean": split.spec.mean[0], "std": split.spec.std[0]}},
        "method": {"name": method, "config": cfg.to_dict()},
        "dataset": {"name": "mnist", "mean": split.spec.mean[0], "std": split.spec.std[0],
                    "num_classes": 10},
        "training": {"epochs": epochs, "batch_size": 16, "lr": 1e-2, "seed": 0, "limit": None,
                     "metrics": [], "seconds": 0.0},
    }
    save_checkpoint(str(out), engine.state_dict(), manifest)
    return str(out)


@pytest.fixture(scope="session")
def ttt_checkpoint(idx_dir, tmp_path_factory) -> str:
    return train_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "ttt", idx_dir, "ttt")


def read_predictions(results: Path) -> dict[str, object]:
    """{shard name: predictions table} of a results folder, metadata dropped."""
    return {p.stem: pq.read_table(p).replace_schema_metadata(None)
            for p in sorted((Path(results) / "predictions").glob("*.parquet"))}


def listing(root: Path) -> list[str]:
    """Every file under `root`, hidden ones included, relative."""
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file())


def copy_shards(src: Path, dst: Path, pattern: str = "*.parquet") -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(Path(src).glob(pattern)):
        shutil.copy(p, dst / p.name)
    return dst


def assert_complete(results: Path, shard_samples: dict[str, int], steps: int) -> None:
    """Exactly one prediction per (sample, step) in every shard; no hidden/partial files."""
    tables = read_predictions(results)
    assert sorted(tables) == sorted(shard_samples)
    for name, table in tables.items():
        pairs = list(zip(table.column("sample_id").to_pylist(), table.column("step").to_pylist()))
        assert len(pairs) == len(set(pairs)) == shard_samples[name] * (steps + 1), name
        assert set(table.column("shard").to_pylist()) == {name}
    hidden = [f for f in listing(results) if any(part.startswith(".") for part in Path(f).parts)]
    assert hidden == []
    assert np.isfinite(np.asarray(pq.read_table(Path(results) / "accuracy.parquet")
                                  .column("accuracy"))).all()
