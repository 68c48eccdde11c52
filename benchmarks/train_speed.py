"""Training images/s per epoch of `pipeline.training.EpochLoop` (the trainer actor's loop).

Synthetic uint8 data of the model's input shape (speed does not depend on the pixels), one
engine (ttt or it3) on a zoo model, the trainer's own batches/augmentation/precision path.
The same script runs on a GPU (`--device cuda`): batches then come from a device-resident
uint8 split (or pinned + prefetched when it does not fit).

    PYTHONPATH=. .venv/bin/python benchmarks/train_speed.py --model seed_cnn --shape 1,28,28 \\
        --batch-size 128 --samples 2048 --epochs 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("MKL_CBWR", "AUTO")

import torch  # noqa: E402

import engines  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.training import Batches, EpochLoop, resolve_recipe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="seed_cnn")
    ap.add_argument("--model-kwargs", default="{}")
    ap.add_argument("--method", default="ttt")
    ap.add_argument("--shape", default="1,28,28", help="C,H,W")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--optimizer", default=None)
    ap.add_argument("--augment", default="none")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    c, h, w = (int(v) for v in args.shape.split(","))
    device = torch.device(args.device)
    kwargs = {"mean": 0.5, "std": 0.25, **json.loads(args.model_kwargs)}
    if args.model.startswith("seed"):
        kwargs.update(in_channels=c, image_size=(h, w))
    torch.manual_seed(0)
    net = build_model(args.model, **kwargs)
    cls = engines.get_engine(args.method)
    from pipeline.models.registry import default_layer

    config = cls.config_cls(layer=default_layer(args.model, args.method))
    engine = cls(net, torch.zeros(1, c, h, w), config).to(device)
    recipe = resolve_recipe("bench", method_lr=config.train_lr, optimizer=args.optimizer,
                            augment=args.augment, precision=args.precision, val_fraction=0.0,
                            image_shape=(c, h, w))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.samples, c, h, w), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (args.samples,), generator=g)
    loop = EpochLoop(engine, recipe, Batches(images, labels, device), None, epochs=args.epochs,
                     batch_size=args.batch_size, seed=0)
    while not loop.finished:
        loop.run(10 ** 9)
    for m in loop.metrics:
        print(json.dumps({"model": args.model, "method": args.method, "shape": [c, h, w],
                          "batch_size": args.batch_size, "threads": args.threads, "device": str(device),
                          "recipe": {k: getattr(recipe, k) for k in ("optimizer", "augment", "precision")},
                          "epoch": m["epoch"], "images_per_s": m["images_per_s"], "seconds": m["seconds"]}))


if __name__ == "__main__":
    main()
