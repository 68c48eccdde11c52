"""Images/s of every ImageNet-C corruption, ours vs imagecorruptions, same images, one process.

    python benchmarks/corruption_rgb_speed.py                 # 32x32 and 224x224, severities 1-5
    python benchmarks/corruption_rgb_speed.py --sizes 224 --n 16 --threads 1

The reference (`imagecorruptions-imaug`, the `test` extra) runs one image at a time as it is
meant to be used; ours takes the whole batch. Both get the same number of threads (torch,
OpenCV). Times are CPU seconds of this process (wall time suffers when the machine is shared),
the least of `--repeat` runs of each (corruption, severity) for both sides; each corruption is
warmed up once first (numba compiles the reference's glass blur). At 224x224
both use make_imagenet_c.py's constants; at 32x32 ours uses make_cifar_c.py's and the reference
its (ImageNet) ones, so the 32x32 ratio compares speed, not identical work.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from scipy import ndimage

from pipeline.corruptions import imagenet_c


def test_images(n: int, size: int) -> np.ndarray:
    """Smooth random colour images (N, 3, size, size) uint8, with edges and flat areas."""
    rng = np.random.default_rng(0)
    x = ndimage.gaussian_filter(rng.random((n, 3, size, size)), (0, 0, size / 32, size / 32))
    x = (x - x.min(axis=(1, 2, 3), keepdims=True)) / np.ptp(x, axis=(1, 2, 3), keepdims=True)
    return np.clip(x * 300 - 20, 0, 255).astype(np.uint8)


def _cpu(fn, repeat: int = 1) -> float:
    """The least CPU time of `repeat` calls of fn."""
    best = float("inf")
    for _ in range(repeat):
        c0 = time.process_time()
        fn()
        best = min(best, time.process_time() - c0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="32,224")
    ap.add_argument("--n", type=int, default=32, help="images per (corruption, severity) above 64x64")
    ap.add_argument("--n-small", type=int, default=256, help="the same at 64x64 and below (cheap images; "
                    "also amortises shot noise's one-off CDF tables)")
    ap.add_argument("--severities", default="1,2,3,4,5")
    ap.add_argument("--threads", type=int, default=1, help="torch and OpenCV threads")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each (corruption, severity); "
                    "the least time counts (one run of 16 images swings by 30 %%)")
    args = ap.parse_args()
    import cv2
    from imagecorruptions import corrupt as reference

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    severities = [int(s) for s in args.severities.split(",")]
    print(f"{args.n} images ({args.n_small} at <= 64x64) per severity, severities {severities}, {args.threads} torch/OpenCV thread(s); "
          f"images/s from CPU time, best of {args.repeat}")
    for size in (int(s) for s in args.sizes.split(",")):
        x = test_images(args.n_small if size <= 64 else args.n, size)
        hwc = x.transpose(0, 2, 3, 1).copy()
        ids = np.arange(len(x))
        print(f"\n{size}x{size} ({imagenet_c.table_for(size, size)} table for ours)\n")
        print("| corruption | ours img/s | imagecorruptions img/s | speed-up |")
        print("|---|---:|---:|---:|")
        total_ours = total_ref = 0.0
        for name in imagenet_c.ALL:
            if name not in imagenet_c.RGB_CORRUPTIONS:
                print(f"| {name} | not implemented | | |")
                continue
            imagenet_c.corrupt(x[:2], name, 1, ids[:2], seed=0)
            reference(hwc[0], severity=1, corruption_name=name)
            ours = sum(_cpu(lambda: imagenet_c.corrupt(x, name, s, ids, seed=0), args.repeat)
                       for s in severities)
            ref = sum(_cpu(lambda: [reference(im, severity=s, corruption_name=name) for im in hwc], args.repeat)
                      for s in severities)
            count = len(x) * len(severities)
            total_ours += ours
            total_ref += ref
            print(f"| {name} | {count / ours:.0f} | {count / ref:.0f} | {ref / ours:.1f}x |", flush=True)
        print(f"| **suite (sum of times)** | | | **{total_ref / total_ours:.1f}x** |")


if __name__ == "__main__":
    main()
