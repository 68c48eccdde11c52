"""Accuracy of TTT and IT3 after 0..K adaptation steps on noisy test images, mean ± sd over seeds.

    .venv/bin/python benchmarks/engine_accuracy.py                       # both, fashion-mnist
    .venv/bin/python benchmarks/engine_accuracy.py --method it3 --seeds 0 --limit-test 2000
    .venv/bin/python benchmarks/engine_accuracy.py --dataset mnist --data-dir ~/data/mnist
    .venv/bin/python benchmarks/engine_accuracy.py --corruption shot_noise --severity 5

Protocol (the seed tutorials): seed_cnn + rotation head on fc2 (TTT) / seed_rescnn + embedder
on conv1 (IT3), built with the dataset's normalisation and trained jointly with the engine
config's recipe (TTT 1 epoch, batch 64, Adam 1e-2, aux 0.35; IT3 2 epochs, batch 256, Adam
1e-3); test set + gaussian_noise severity 5 (N(0, 2²) in normalised units, corruption seed 0);
`--corruption/--severity` test the defaults on shifts they were not chosen on;
episodic adaptation per test batch with the config's batch size, lr and optimizer. One anytime
`adapt` run per batch gives every step 0..K. One training seed = model init + aux init.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engines  # noqa: E402
from pipeline.corruptions import CORRUPTIONS  # noqa: E402
from _common import apply_sets, build_engine, clean_accuracy, evaluate, load_data, mean_sd, train  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--method", choices=("ttt", "it3", "both"), default="both")
    ap.add_argument("--dataset", default="fashion-mnist", choices=("fashion-mnist", "mnist"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--corruption", default="gaussian_noise", choices=sorted(CORRUPTIONS),
                    metavar="NAME", help="test corruption (python -m pipeline.corruptions "
                    "--markdown lists them)")
    ap.add_argument("--severity", type=int, default=5, choices=range(1, 6))
    ap.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    ap.add_argument("--steps", type=int, default=None,
                    help="report steps 0..K (default: 3 for TTT, the config's steps for IT3 "
                         "and at least 3)")
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--limit-test", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None, help="test-time lr (default: config)")
    ap.add_argument("--adapt-params", default=None, help="model | encoder | norm | all")
    ap.add_argument("--distance", default=None, help="IT3: dot | mse | cosine | js | kl")
    ap.add_argument("--variant", default=None, help="IT3: paper | torch_ttt")
    ap.add_argument("--null", default=None, help="IT3: zeros | uniform | learned | none")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other config field, e.g. --set detach_target=true (repeatable)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest for these tiny nets on a shared CPU)")
    ap.add_argument("--json", default=None, help="write the results to this file")
    ap.add_argument("--preset", default=None,
                    help="start from a named config preset instead of the defaults, e.g. 'seeds' "
                         "(the seed tutorials' protocol, with which the README's tables were made)")
    return ap.parse_args(argv)


def method_config(method: str, args: argparse.Namespace) -> engines.EngineConfig:
    cls = engines.get_engine(method).config_cls
    changes = {"lr": args.lr, "adapt_params": args.adapt_params}
    if method == "it3":
        changes.update(distance=args.distance, variant=args.variant, null=args.null)
    changes = {k: v for k, v in changes.items() if v is not None}
    base = cls.preset(args.preset) if args.preset else cls()
    return apply_sets(base.replace(**changes), args.set)


def run_method(method: str, args: argparse.Namespace, data) -> dict:
    config = method_config(method, args)
    steps = args.steps if args.steps is not None else max(3, config.steps)
    rows, runs = [], []
    for seed in [int(s) for s in args.seeds.split(",")]:
        engine = build_engine(method, data.spec, seed, config)
        info = train(engine, data.x_train, data.y_train)
        t0 = time.perf_counter()
        acc = evaluate(engine, data.x_test, data.y_test, steps)
        info.update(seed=seed, eval_seconds=time.perf_counter() - t0, accuracy=acc.tolist(),
                    clean_accuracy=clean_accuracy(engine, data.x_clean, data.y_test))
        rows.append(acc)
        runs.append(info)
        print(f"  {method} seed {seed}: clean {info['clean_accuracy']:.2f}%, noisy "
              + " ".join(f"{a:.2f}" for a in acc)
              + f"  (train {info['seconds']:.0f}s, adapt {info['eval_seconds']:.0f}s)",
              flush=True)
    mean, sd = mean_sd(rows)
    return {"method": method, "config": config.to_dict(), "steps": steps, "runs": runs,
            "mean": mean.tolist(), "sd": sd.tolist(), "default_steps": config.steps}


def print_table(res: dict, n_seeds: int) -> None:
    mean, sd = res["mean"], res["sd"]
    print(f"\n{res['method']}: accuracy (%) on noisy test, mean ± sd over {n_seeds} seed(s); "
          f"config steps = {res['default_steps']}")
    print("| step | accuracy | gain over step 0 |\n|---|---|---|")
    gains = [[r["accuracy"][k] - r["accuracy"][0] for r in res["runs"]]
             for k in range(len(mean))]
    for k, (m, s) in enumerate(zip(mean, sd)):
        gk = torch.tensor(gains[k], dtype=torch.float64)
        gsd = float(gk.std()) if len(gk) > 1 else 0.0
        mark = " (default)" if k == res["default_steps"] else ""
        print(f"| {k}{mark} | {m:.2f} ± {s:.2f} | {float(gk.mean()):+.2f} ± {gsd:.2f} |")


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = ["ttt", "it3"] if args.method == "both" else [args.method]
    data = load_data(args.dataset, args.data_dir, args.limit_train, args.limit_test,
                     args.corruption, args.severity)
    print(f"{args.dataset}: {len(data.x_train)} train, {len(data.x_test)} test images "
          f"({args.corruption} s{args.severity}), seeds {args.seeds}, {args.threads} thread(s)", flush=True)
    results = {"dataset": args.dataset, "corruption": args.corruption,
               "severity": args.severity, "argv": sys.argv[1:], "n_train": len(data.x_train),
               "n_test": len(data.x_test), "methods": {}}
    for method in methods:
        res = run_method(method, args, data)
        results["methods"][method] = res
        print_table(res, len(args.seeds.split(",")))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
