"""The standard continual comparison: RobustBench's "Standard" WRN-28-10 on CIFAR-10-C, severity
5, the 15 corruptions in the standard order, one online stream (state carried across the
corruptions, never reset), batch 200 — mean error per method beside the published table.

    .venv/bin/python benchmarks/robustbench_cifar10c.py --weights ~/models/Standard.pt \\
        --cifar10c-dir ~/data/CIFAR-10-C --cifar10-dir ~/data          # the real comparison
    .venv/bin/python benchmarks/robustbench_cifar10c.py --smoke --cifar10c-dir DIR \\
        --cifar10-dir DIR2                 # plumbing only: random wrn28_10, tiny settings

Files (none is downloaded here):
- --weights: RobustBench's `Standard` CIFAR-10 Linf model file (robustbench `load_model(
  "Standard", dataset="cifar10", threat_model="Linf")` writes models/cifar10/Linf/Standard.pt),
  read by pipeline.model_import.import_model (weights_only torch.load; `module.`/`model.`
  prefixes stripped) into a source checkpoint in a temporary folder;
- --cifar10c-dir: the extracted CIFAR-10-C (zenodo.org/records/2535967): `<corruption>.npy`
  uint8 (50000, 32, 32, 3) and labels.npy, read by pipeline.datasets.importers (`cifar-c`);
  rows in file order (the released files keep the clean test order, as the Döbler
  collection's loader reads them);
- --cifar10-dir: clean CIFAR-10 (pipeline.datasets `cifar10`), only for EATA's Fisher (2000
  training images, as the official EATA `--fisher_size 2000`).

Methods run with their engines' defaults (engines/*.py cite each value; they are the Döbler
cfgs/cifar10_c/*.yaml settings) in online mode, on the same stream. Published mean errors
(%): the CIFAR10-to-CIFAR10-C "continual" column of github.com/mariodoebler/test-time-adaptation
README (Standard WRN-28-10, severity 5, batch 200): source 43.5, norm_test (BN) 20.4, tent
20.0, eata 17.9, sar 20.4, cotta 16.5; the CoTTA paper (Wang et al., CVPR 2022, Table 1) has
source 43.5, BN adapt 20.4 and CoTTA 16.2 on the same protocol.

--smoke checks the plumbing end to end, not the numbers: a randomly initialised model (no
--weights), `--limit 2` rows per corruption, batches of 2, CoTTA with 2 augmentations instead
of 32 (its default costs 33 WRN forwards per batch), EATA's Fisher from 4 clean images.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engines  # noqa: E402
from pipeline.errors import TTTPipeError  # noqa: E402

STANDARD_ORDER = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
                  "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
                  "elastic_transform", "pixelate", "jpeg_compression")
PUBLISHED = {"source": 43.5, "norm": 20.4, "tent": 20.0, "eata": 17.9, "sar": 20.4,
             "cotta": 16.5}
DEFAULT_METHODS = ("source", "norm", "tent", "eata", "sar", "cotta")
FISHER_N, FISHER_SEED = 2000, 0
SMOKE = {"limit": 2, "batch_size": 2, "cotta_n_aug": 2, "fisher_n": 4}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--weights", default=None, help="RobustBench Standard.pt (a state_dict file)")
    ap.add_argument("--cifar10c-dir", required=True, help="extracted CIFAR-10-C folder")
    ap.add_argument("--cifar10-dir", default=None, help="clean CIFAR-10 (EATA's Fisher)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma-separated engines (default {','.join(DEFAULT_METHODS)}; also "
                         "lame, memo)")
    ap.add_argument("--model", default="wrn28_10", help="zoo architecture of --weights")
    ap.add_argument("--corruptions", default=",".join(STANDARD_ORDER),
                    help="stream order (default: the 15 in the standard order)")
    ap.add_argument("--severity", type=int, default=5, choices=range(1, 6))
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--limit", type=int, default=None,
                    help="first N rows of each corruption (default all 10000)")
    ap.add_argument("--smoke", action="store_true",
                    help="random init, --limit 2, batch 2, CoTTA 2 augmentations, Fisher from 4 "
                         "images (plumbing only)")
    ap.add_argument("--seed", type=int, default=0, help="the engines' seed (and smoke init)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.limit = args.limit or SMOKE["limit"]
        args.batch_size = min(args.batch_size, SMOKE["batch_size"])
    return args


def check_files(args, methods: list[str]) -> None:
    """Everything the run reads, before any work: one line naming the missing file and the fix."""
    src = Path(args.cifar10c_dir).expanduser()
    if not src.is_dir():
        raise TTTPipeError(f"--cifar10c-dir {src} is not a folder; download CIFAR-10-C "
                           "(zenodo.org/records/2535967) and pass the extracted folder")
    missing = [n for n in ["labels", *args.corruptions] if not (src / f"{n}.npy").is_file()]
    if missing:
        raise TTTPipeError(f"{src} has no {missing[0]}.npy ({len(missing)} file(s) missing); "
                           "pass the extracted CIFAR-10-C folder or choose --corruptions "
                           "among its files")
    if not args.smoke:
        if args.weights is None:
            raise TTTPipeError("--weights is required (RobustBench's Standard.pt); or pass "
                               "--smoke to check the plumbing with a random model")
        if "://" not in args.weights and not Path(args.weights).expanduser().is_file():
            raise TTTPipeError(f"--weights {args.weights} does not exist; pass the file "
                               "robustbench writes at models/cifar10/Linf/Standard.pt")
    if "eata" in methods and args.cifar10_dir is None:
        raise TTTPipeError("eata needs clean training images for its Fisher: pass "
                           "--cifar10-dir (clean CIFAR-10) or drop eata from --methods")


def load_model(args, spec) -> torch.nn.Module:
    from pipeline.checkpoint import build_model_from_checkpoint, load_checkpoint
    from pipeline.model_import import import_model
    from pipeline.model_spec import build_model_from_spec, resolve_model_spec

    if args.weights is None:  # --smoke: the architecture with a seeded random init
        torch.manual_seed(args.seed)
        return build_model_from_spec(resolve_model_spec(args.model, spec)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "source")
        import_model(args.model, str(Path(args.weights).expanduser()), spec.name, out)
        return build_model_from_checkpoint(load_checkpoint(out, expect_method="source")).eval()


def load_stream(args, spec) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """[(corruption, images float (n, 3, 32, 32) in [0, 1], labels (n,))] in stream order."""
    from pipeline.datasets.importers import plan_import, read_unit

    units = plan_import("cifar-c", args.cifar10c_dir, spec, corruptions=args.corruptions,
                        severities=[args.severity])
    stream = []
    for unit in units:
        order = np.argsort(unit.sample_ids, kind="stable")  # file order, not the import shuffle
        if args.limit is not None:
            order = order[:args.limit]
        _, labels, images = read_unit(unit, order)
        stream.append((unit.corruption, torch.from_numpy(images).float() / 255.0,
                       torch.from_numpy(labels)))
    return stream


def fisher_batches(args, batch_size: int) -> list[torch.Tensor]:
    from pipeline.datasets import load_split

    train = load_split("cifar10", "train", data_dir=args.cifar10_dir)
    count = SMOKE["fisher_n"] if args.smoke else FISHER_N
    rows = np.random.default_rng(FISHER_SEED).permutation(len(train))[:count]
    return list((torch.from_numpy(train.images[np.sort(rows)]).float() / 255.0).split(batch_size))


def make_engine(method: str, model, args) -> engines.Engine:
    import copy

    cls = engines.get_engine(method)
    changes = {"seed": args.seed, "mode": "online", "batch_size": args.batch_size}
    if method == "cotta" and args.smoke:
        changes["n_aug"] = SMOKE["cotta_n_aug"]
    config = cls.config_cls().replace(**changes)
    engine = cls(copy.deepcopy(model), torch.zeros(1, 3, 32, 32), config).eval()
    if method == "eata":
        engine.compute_fisher(fisher_batches(args, args.batch_size))
    return engine


def run_continual(engine: engines.Engine, stream, batch_size: int) -> dict[str, float]:
    """Error (%) per corruption of one online run over the whole stream (never reset)."""
    errors = {}
    for name, x, y in stream:
        wrong = 0
        for i in range(0, len(x), batch_size):
            logits = engine.adapt(x[i:i + batch_size], mode="online").logits[-1]
            wrong += int((logits.argmax(1) != y[i:i + batch_size]).sum())
        errors[name] = 100.0 * wrong / len(y)
    return errors


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.corruptions = [c.strip() for c in args.corruptions.split(",") if c.strip()]
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        joint = [m for m in methods if engines.get_engine(m).needs_joint_training]
    except ValueError as exc:
        raise TTTPipeError(str(exc)) from None
    if joint:
        raise TTTPipeError(f"{joint[0]} needs its joint checkpoint (an auxiliary part); this "
                           "comparison adapts the source model: choose among "
                           + ", ".join(m for m in engines.list_engines()
                                       if not engines.get_engine(m).needs_joint_training))
    check_files(args, methods)
    from pipeline.datasets import get_dataset

    spec = get_dataset("cifar10")
    model = load_model(args, spec)
    stream = load_stream(args, spec)
    n = sum(len(y) for _, _, y in stream)
    print(f"CIFAR-10-C severity {args.severity}: {len(stream)} corruptions, {n} images, batch "
          f"{args.batch_size}, {args.model} ({'random init' if args.weights is None else args.weights})"
          + (" [smoke: plumbing only]" if args.smoke else ""), flush=True)
    res = {"argv": sys.argv[1:] if argv is None else list(argv), "smoke": args.smoke,
           "batch_size": args.batch_size, "n_images": n, "methods": {}}
    for method in methods:
        t0 = time.perf_counter()
        engine = make_engine(method, model, args)
        errors = run_continual(engine, stream, args.batch_size)
        sec = time.perf_counter() - t0
        res["methods"][method] = {"errors": errors, "mean": float(np.mean(list(errors.values()))),
                                  "seconds": sec}
        print(f"  {method:6s} mean error {res['methods'][method]['mean']:5.1f} % ({sec:.1f} s)",
              flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
    print_table(res)
    return res


def print_table(res: dict) -> None:
    print("\n| method | mean error % (this run) | published (Döbler README) |\n|---|---|---|")
    for m, r in res["methods"].items():
        pub = PUBLISHED.get(m)
        print(f"| {m} | {r['mean']:.1f} | {'' if pub is None else f'{pub:.1f}'} |")


if __name__ == "__main__":
    try:
        main()
    except TTTPipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
