"""Seconds to corrupt 10k images, per corruption and severity (`python benchmarks/corruption_speed.py`).

Uses the Fashion-MNIST test images when Debian's dataset-fashion-mnist is installed,
otherwise random blobs; pass `--n 2000` for a quicker run, `--severities 1,5` to choose.
"""

from __future__ import annotations

import argparse
import gzip
import os
import time

import numpy as np
from scipy import ndimage

from pipeline.corruptions import corrupt, list_corruptions, parse_severities

IDX = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"


def test_images(n: int) -> tuple[np.ndarray, str]:
    if os.path.exists(IDX):
        with gzip.open(IDX) as f:
            raw = np.frombuffer(f.read()[16:], dtype=np.uint8).reshape(-1, 1, 28, 28)
        reps = -(-n // len(raw))
        return (np.tile(raw, (reps, 1, 1, 1))[:n] / 255.0).astype(np.float32), "fashion-mnist test"
    rng = np.random.default_rng(0)
    blobs = ndimage.gaussian_filter(rng.random((n, 28, 28)), (0, 2, 2))
    return np.clip((blobs - 0.5) * 8, 0, 1)[:, None].astype(np.float32), "random blobs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--severities", default="1,3,5")
    args = ap.parse_args()
    severities = parse_severities(args.severities)
    images, source = test_images(args.n)
    ids = np.arange(len(images))
    print(f"{len(images)} images ({source}); seconds per 10k images, one process: "
          "CPU time (wall time in brackets; wall suffers when the machine is shared)")
    print("| corruption | " + " | ".join(f"s{s}" for s in severities) + " |")
    print("|---|" + "---|" * len(severities))
    for name in ["identity", *list_corruptions()]:
        cells = []
        for s in severities:
            t0, c0 = time.perf_counter(), time.process_time()
            corrupt(images, name, s, ids, seed=0, norm_std=0.3081)
            scale = 10_000 / len(images)
            cpu, wall = (time.process_time() - c0) * scale, (time.perf_counter() - t0) * scale
            cells.append(f"{cpu:.2f} ({wall:.2f})")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
