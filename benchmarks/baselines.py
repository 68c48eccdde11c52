"""The baselines on Fashion-MNIST with `seed_cnn_bn`: every method's accuracy on the whole
grayscale corruption suite (mnist-c, 16 corruptions) at one severity, i.i.d. and continual,
mean ± sd over training seeds, beside the unadapted source model. In-process: pipeline +
engines, no Ray.

    nice -n 10 .venv/bin/python benchmarks/baselines.py                    # everything, all rows
    # the README table ran in four parts (500-row subset) merged with --tables: see
    # benchmarks/README.md, "Baselines on Fashion-MNIST (seed_cnn_bn)"
    .venv/bin/python benchmarks/baselines.py --methods source,norm,tent --seeds 0 --limit-test 1000
    .venv/bin/python benchmarks/baselines.py --measure-cost               # seconds per cell

Protocol
- Models, per training seed s (model init and shuffle): a plain source model (`seed_cnn_bn`
  trained on CE alone with pipeline/training's EpochLoop and SourceConfig's recipe: 1 epoch,
  batch 64, Adam 1e-3, no augmentation — what `ttt-pipe train --method source` trains), and
  for ttt / it3 their own joint checkpoints (TTTConfig / IT3Config recipes, same loop). Cached
  under ~/.cache/ttt-pipe/bench/baselines (delete it, or --retrain, to train again).
- Test data: the test split (or a fixed subset: the first `--limit-test` rows of a permutation
  seeded 0, the same for every method, seed and corruption), each corruption at `--severity`
  with corruption seed 0 (pipeline.corruptions.suites.corrupt_batch, suite "mnist-c").
- i.i.d.: per corruption, a fresh start from the source weights (`reset()` between
  corruptions), batches of the method's default size in test order, each batch from one
  corruption, the method's default mode (online for norm/tent/eata/sar/cotta/lame: state
  carried across the batches of one corruption; episodic for memo/ttt/it3).
- continual: the corruptions in the suite's order (pipeline.corruptions.list_corruptions),
  one run, never reset, every method in online mode (memo and ttt/it3 too: their weights
  carry from batch to batch; memo's from sample to sample).
- Hyper-parameters: each engine's defaults (engines/*.py cite the papers); nothing is tuned on
  these images and the prediction scored is the one after the default number of steps (no
  oracle step). EATA's Fisher: 2000 clean training images (a seeded permutation of the train
  split), batches of its batch size. The test-time seed of every engine = the training seed.
- memo is per sample with 32 AugMix views: it runs on the first `--memo-limit` test rows of
  the subset (stated in the table).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engines  # noqa: E402
from pipeline.corruptions import list_corruptions  # noqa: E402
from pipeline.corruptions.suites import corrupt_batch  # noqa: E402
from pipeline.datasets import load_split  # noqa: E402
from pipeline.datasets.base import CACHE_ROOT  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.training import Batches, EpochLoop, resolve_recipe  # noqa: E402
from pipeline.training.supervised import Supervised  # noqa: E402

MODEL = "seed_cnn_bn"
METHODS = ("source", "norm", "tent", "eata", "sar", "cotta", "lame", "memo", "ttt", "it3")
JOINT = ("ttt", "it3")  # methods that adapt their own joint checkpoint
CORRUPTION_SEED, SUBSET_SEED, FISHER_SEED, FISHER_N = 0, 0, 0, 2000
CACHE = CACHE_ROOT / "bench" / "baselines"
MEMO_REF = "source@memo-rows"  # the source model on the rows memo ran on


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    ap.add_argument("--severity", type=int, default=5, choices=range(1, 6))
    ap.add_argument("--corruptions", default="all", help="'all' (suite order) or names a,b")
    ap.add_argument("--protocols", default="iid,continual")
    ap.add_argument("--limit-test", type=int, default=None,
                    help="a fixed seeded subset of the test split (default: all 10000)")
    ap.add_argument("--memo-limit", type=int, default=200,
                    help="memo runs on the first N rows of the subset (per sample, 32 views)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--retrain", action="store_true", help="ignore the cached checkpoints")
    ap.add_argument("--measure-cost", action="store_true",
                    help="time one corruption per method on seed 0 and stop")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write every number to this file")
    ap.add_argument("--tables", default=None, metavar="A.json,B.json",
                    help="print the tables of earlier --json files (merged) and stop")
    return ap.parse_args(argv)


# -- models ------------------------------------------------------------------------------------
def _fresh_model(spec, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(MODEL, mean=spec.mean[0], std=spec.std[0], num_classes=spec.num_classes)


def _train(module: nn.Module, cfg: engines.EngineConfig, train, seed: int) -> float:
    recipe = resolve_recipe(train.spec.name, method_lr=cfg.train_lr)
    batches = Batches(torch.from_numpy(train.images), torch.from_numpy(train.labels), "cpu")
    loop = EpochLoop(module, recipe, batches, None, epochs=cfg.train_epochs,
                     batch_size=cfg.train_batch_size, seed=seed)
    t0 = time.perf_counter()
    while not loop.finished:
        loop.run(10_000)
    module.eval()
    return time.perf_counter() - t0


def trained(kind: str, spec, train, seed: int, retrain: bool) -> tuple[nn.Module, dict]:
    """kind "source" -> the plain model; "ttt"/"it3" -> its trained engine (cached)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{MODEL}_{spec.name}_{kind}_seed{seed}.pt"
    model = _fresh_model(spec, seed)
    example = torch.zeros(1, *spec.image_shape)
    if kind == "source":
        cfg = engines.SourceConfig()
        module = Supervised(model)  # CE alone: what `train --method source` trains
    else:
        cfg = engines.get_engine(kind).config_cls(seed=seed)
        module = engines.get_engine(kind)(model, example, cfg)
    info = {"train_seconds": None, "cached": path.exists() and not retrain}
    if info["cached"]:
        module.load_state_dict(torch.load(path, weights_only=True))
    else:
        info["train_seconds"] = _train(module, cfg, train, seed)
        torch.save(module.state_dict(), path)
    module.eval()
    return (model if kind == "source" else module), info


# -- data --------------------------------------------------------------------------------------
def test_rows(n_test: int, limit: int | None) -> np.ndarray:
    if limit is None or limit >= n_test:
        return np.arange(n_test)
    return np.sort(np.random.default_rng(SUBSET_SEED).permutation(n_test)[:limit])


def corrupted(test, name: str, severity: int, rows: np.ndarray) -> torch.Tensor:
    """(n, 1, 28, 28) float32 pixel units; the sample ids are the test rows (stable per image)."""
    x = corrupt_batch(test.images[rows], name, severity, rows, CORRUPTION_SEED,
                      suite="mnist-c", std=test.spec.std)
    return torch.from_numpy(np.ascontiguousarray(x))


def fisher_batches(train, batch_size: int) -> list[torch.Tensor]:
    rows = np.sort(np.random.default_rng(FISHER_SEED).permutation(len(train))[:FISHER_N])
    x = torch.from_numpy(train.images[rows]).float() / 255.0
    return list(x.split(batch_size))


# -- engines -----------------------------------------------------------------------------------
def make_engine(method: str, source: nn.Module, joint: dict, spec, train, seed: int
                ) -> engines.Engine:
    """A fresh engine on a copy of the right weights, with the method's default config."""
    import copy

    example = torch.zeros(1, *spec.image_shape)
    if method in JOINT:
        engine = copy.deepcopy(joint[method])
    else:
        cls = engines.get_engine(method)
        engine = cls(copy.deepcopy(source), example, cls.config_cls(seed=seed))
        if method == "eata":
            engine.compute_fisher(fisher_batches(train, engine.config.batch_size))
    engine.eval()
    return engine


def run_stream(engine: engines.Engine, x: torch.Tensor, y: torch.Tensor, mode: str) -> int:
    """Correct predictions over one stream of batches (the config's batch size, in order)."""
    bs = engine.config.batch_size
    correct = 0
    for i in range(0, len(x), bs):
        logits = engine.adapt(x[i:i + bs], mode=mode).logits[-1]
        correct += int((logits.argmax(1) == y[i:i + bs]).sum())
    return correct


def evaluate(method: str, engine: engines.Engine, sets: dict, protocol: str, limit: int | None
             ) -> dict[str, float]:
    """Accuracy (%) per corruption (suite order) under `protocol`."""
    out = {}
    mode = engine.config.mode if protocol == "iid" else "online"
    for name, (x, y) in sets.items():
        if limit is not None:
            x, y = x[:limit], y[:limit]
        if protocol == "iid":
            engine.reset()
        out[name] = 100.0 * run_stream(engine, x, y, mode) / len(y)
    return out


def merge(files: list[str]) -> dict:
    """One result from several --json runs of the same protocol (e.g. methods run apart)."""
    out: dict = {}
    for f in files:
        r = json.loads(Path(f).read_text())
        if out and (r["n_test"], r["severity"], r["seeds"]) != \
                (out["n_test"], out["severity"], out["seeds"]):
            raise SystemExit(f"{f}: another protocol (rows, severity or seeds) than {files[0]}")
        for key in ("runs", "training", "seconds", "batch_size"):
            out.setdefault(key, {}).update(r[key])
        out.update({k: v for k, v in r.items() if k not in ("runs", "training", "seconds",
                                                             "batch_size")})
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.tables:
        res = merge(args.tables.split(","))
        methods = [m for m in (*METHODS, MEMO_REF) if any(k.startswith(f"{m}/") for k in res["runs"])]
        protocols = [p for p in ("iid", "continual") if any(f"/{p}/" in k for k in res["runs"])]
        print_tables(res, methods, protocols, res["corruptions"])
        return res
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        engines.get_engine(m)  # unknown name: the registry's one-line error
    seeds = [int(s) for s in args.seeds.split(",")]
    protocols = [p.strip() for p in args.protocols.split(",")]
    names = list_corruptions() if args.corruptions == "all" else args.corruptions.split(",")
    train = load_split("fashion-mnist", "train", data_dir=args.data_dir)
    test = load_split("fashion-mnist", "test", data_dir=args.data_dir)
    spec = train.spec
    rows = test_rows(len(test), args.limit_test)
    y = torch.from_numpy(test.labels[rows])
    if args.measure_cost:
        names = ["gaussian_noise"]
    t0 = time.perf_counter()
    sets = {n: (corrupted(test, n, args.severity, rows), y) for n in names}
    print(f"fashion-mnist: {len(rows)} test rows x {len(names)} corruptions at severity "
          f"{args.severity} (corrupted in {time.perf_counter() - t0:.0f} s), seeds {seeds}, "
          f"{args.threads} thread(s)", flush=True)
    if args.measure_cost:
        seeds, protocols = seeds[:1], ["iid"]
    res: dict = {"argv": sys.argv[1:], "n_test": len(rows), "severity": args.severity,
                 "corruptions": names, "seeds": seeds, "memo_limit": args.memo_limit,
                 "runs": {}, "training": {}, "seconds": {}, "batch_size": {}}
    for seed in seeds:
        source, info = trained("source", spec, train, seed, args.retrain)
        res["training"][f"source/{seed}"] = info
        joint = {}
        for kind in [m for m in methods if m in JOINT]:
            joint[kind], info = trained(kind, spec, train, seed, args.retrain)
            res["training"][f"{kind}/{seed}"] = info
        for method in methods:
            limit = args.memo_limit if method == "memo" else None
            for protocol in protocols:
                engine = make_engine(method, source, joint, spec, train, seed)
                res["batch_size"][method] = engine.config.batch_size
                t1 = time.perf_counter()
                acc = evaluate(method, engine, sets, protocol, limit)
                sec = time.perf_counter() - t1
                n = sum(len(v[1][:limit] if limit else v[1]) for v in sets.values())
                res["runs"][f"{method}/{protocol}/{seed}"] = acc
                res["seconds"][f"{method}/{protocol}/{seed}"] = sec
                print(f"  seed {seed} {method:6s} {protocol:9s} mean {np.mean(list(acc.values())):6.2f}"
                      f"  ({sec:.1f} s, {1e3 * sec / n:.2f} ms/image)", flush=True)
                if method == "memo":  # the unadapted model on memo's rows, to compare with
                    ref = evaluate("source", make_engine("source", source, joint, spec, train, seed),
                                   sets, protocol, limit)
                    res["runs"][f"{MEMO_REF}/{protocol}/{seed}"] = ref
                    res["batch_size"][MEMO_REF] = engine.config.batch_size
                if args.json:
                    Path(args.json).write_text(json.dumps(res, indent=1))
    if "memo" in methods:
        methods = [*methods, MEMO_REF]
    print_tables(res, methods, protocols, names)
    return res


def _cell(values: list[float]) -> str:
    a = np.asarray(values)
    sd = a.std(ddof=1) if len(a) > 1 else 0.0
    return f"{a.mean():.1f} ± {sd:.1f}"


def print_tables(res: dict, methods: list[str], protocols: list[str], names: list[str]) -> None:
    seeds = res["seeds"]
    for protocol in protocols:
        print(f"\n{protocol}: accuracy % (mean ± sd over seeds {seeds}), severity "
              f"{res['severity']}, {res['n_test']} test rows")
        print("| method | batch | mean | " + " | ".join(names) + " |")
        print("|---|---|---|" + "---|" * len(names))
        for m in methods:
            runs = [res["runs"].get(f"{m}/{protocol}/{s}") for s in seeds]
            if any(r is None for r in runs):
                continue
            means = [np.mean([r[n] for n in names]) for r in runs]
            cells = [_cell([r[n] for r in runs]) for n in names]
            print(f"| {m} | {res['batch_size'][m]} | {_cell(means)} | " + " | ".join(cells) + " |")
        noise_check(res, protocol, names)


NOISE = ("gaussian_noise", "shot_noise", "impulse_noise")


def noise_check(res: dict, protocol: str, names: list[str]) -> None:
    """Every published table has BN-adapt and Tent above the source model on the noises: say
    per training seed whether that holds here."""
    for m in ("norm", "tent"):
        for n in (c for c in NOISE if c in names):
            pairs = [(res["runs"].get(f"{m}/{protocol}/{s}"), res["runs"].get(f"source/{protocol}/{s}"))
                     for s in res["seeds"]]
            if any(a is None or b is None for a, b in pairs):
                continue
            gains = [a[n] - b[n] for a, b in pairs]
            verdict = "beats" if min(gains) > 0 else "does NOT beat"
            print(f"  {m} {verdict} source on {n} on every seed "
                  f"(gain {' / '.join(f'{g:+.1f}' for g in gains)})")


if __name__ == "__main__":
    main()
