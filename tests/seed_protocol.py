"""The seeds' protocol on the tests' tiny synthetic MNIST: train briefly, adapt, predict.

``python tests/seed_protocol.py`` (run with main at 2fc45bf on PYTHONPATH, before the
arbitrary-shape changes) wrote ``tests/data/seed_protocol.json``; the test
``tests/jobs/test_seed_protocol.py`` recomputes the same with the current code and asserts
identical predictions. The checkpoints are built from the engines' "seeds" preset
(`TTTConfig.preset("seeds")`, `IT3Config.preset("seeds")`: the settings of 2fc45bf, written out
in full), so the record holds whatever the defaults become.

What runs: the ``idx_dir`` mnist data of tests/conftest.py (64 train, 32 test images),
``make_shards(..., "gaussian_noise", "5", shard_size=16, seed=0)`` (identity + gaussian
noise s5, two shards each), seed_cnn trained jointly for 3 epochs with TTT and with IT3
(``tests/jobs/adapt_fixtures.train_tiny_checkpoint(..., preset="seeds")``), then every shard
adapted episodically
(2 steps, lr 1e-2, batch 6) with ``jobs.shard_worker.predict_shard``, one torch thread.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("MKL_CBWR", "AUTO")
os.environ.setdefault("TTT_PIPE_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "jobs")]

RECORD = HERE / "data" / "seed_protocol.json"
METHODS = ("ttt", "it3")
STEPS, LR, BATCH = 2, 1e-2, 6
PRESET = "seeds"

__all__ = ["RECORD", "METHODS", "PRESET", "compute_predictions"]


def compute_predictions(root: Path) -> dict:
    """{method: {shard: {"sample_id", "step", "pred", "confidence"}}} for the protocol."""
    import torch
    from adapt_fixtures import train_tiny_checkpoint
    from helpers import write_dataset

    from jobs.shard_worker import AdaptSettings, predict_shard
    from pipeline.checkpoint import build_engine_from_checkpoint, load_checkpoint
    from pipeline.shard_maker import make_shards
    from pipeline.shards import read_shard

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = Path(root)
        write_dataset(root / "idx" / "mnist", n_train=64, n_test=32, gz=True, seed=0)
        shards = root / "shards"
        make_shards("mnist", str(shards), "gaussian_noise", "5", data_dir=root / "idx" / "mnist",
                    shard_size=16, seed=0)
        out: dict = {}
        for method in METHODS:
            uri = train_tiny_checkpoint(root / "ckpt" / method, root / "idx", method, preset=PRESET)
            ckpt = load_checkpoint(uri)
            engine = build_engine_from_checkpoint(ckpt)
            engine.eval()
            settings = AdaptSettings(method=method, weights_sha256=ckpt.manifest["weights_sha256"],
                                     steps=STEPS, lr=LR, batch_size=BATCH)
            out[method] = {}
            for path in sorted(shards.glob("*.parquet")):
                table = predict_shard(engine, read_shard(str(path)), settings).to_pydict()
                out[method][path.stem] = {
                    "sample_id": table["sample_id"], "step": table["step"], "pred": table["pred"],
                    "confidence": [round(float(c), 6) for c in table["confidence"]]}
        return out
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        result = compute_predictions(Path(tmp))
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    RECORD.write_text(json.dumps(result, separators=(",", ":"), sort_keys=True) + "\n")
    print(f"wrote {RECORD}")
