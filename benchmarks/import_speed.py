"""`import-corrupted` speed and size: rows/s and bytes per image, CIFAR-10-C and ImageNet-C layouts.

Writes a synthetic release of the real shapes (CIFAR-10-C: one corruption, uint8 (50000, 32,
32, 3) + labels.npy; ImageNet-C: one (corruption, severity) of N 224x224 JPEGs over a few
wnids), imports it in this process (`pipeline.shard_import.import_shards`, no Ray: the
per-task cost; the Ray job runs the same tasks in parallel) and prints rows/s and the shard
bytes per image next to the uint8 payload (3,072 and 150,528 bytes).

Usage: PYTHONPATH=. .venv/bin/python benchmarks/import_speed.py [--imagenet 200] [DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def smooth_images(n: int, size: int, seed: int) -> np.ndarray:
    """(n, size, size, 3) uint8 photos-ish: gradients + noise (compress like natural images)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        a, b = rng.uniform(0.2, 2.0, 2)
        base = np.stack([a * xx, b * yy, (a * xx + b * yy) / 2], -1) % 256
        out[i] = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    return out


def run(label: str, layout: str, src: Path, dataset: str, out: Path, payload: int, **kw) -> None:
    from pipeline.shard_import import import_shards

    t = time.perf_counter()
    summary = import_shards(layout, src, dataset, str(out), **kw)
    seconds = time.perf_counter() - t
    print(f"{label}: {summary.rows:,} rows in {seconds:.1f} s = {summary.rows / seconds:,.0f} rows/s; "
          f"{len(summary.shards)} shards, {summary.bytes / summary.rows:,.0f} bytes/image "
          f"(uint8 payload {payload:,}: {summary.bytes / summary.rows / payload:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?")
    parser.add_argument("--imagenet", type=int, default=200, help="ImageNet-C JPEGs to write")
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="import_speed_"))
    cifar = root / "CIFAR-10-C"
    if not (cifar / "fog.npy").exists():
        cifar.mkdir(parents=True, exist_ok=True)
        np.save(cifar / "fog.npy", smooth_images(50_000, 32, 0))
        np.save(cifar / "labels.npy", np.tile(np.arange(10_000) % 10, 5).astype(np.uint8))
    run("cifar-c (1 corruption x 5 severities x 10,000)", "cifar-c", cifar, "cifar10",
        root / "out_cifar", 3072)

    from PIL import Image

    from pipeline.datasets import imagenet_wnids

    inet = root / "imagenet-c"
    wnids = imagenet_wnids()[:10]
    if not (inet / "fog").exists():
        images = smooth_images(args.imagenet, 224, 1)
        for i, image in enumerate(images):
            path = inet / "fog" / "3" / wnids[i % len(wnids)] / f"ILSVRC2012_val_{i:08d}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path, quality=85)
    run(f"imagenet-c (fog s3, {args.imagenet} JPEGs 224x224)", "imagenet-c", inet, "imagenet",
        root / "out_imagenet", 150_528, severities="3")


if __name__ == "__main__":
    main()
