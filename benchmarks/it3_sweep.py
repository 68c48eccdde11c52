"""IT3 recipe sweep: train once per training config, evaluate several test-time configs on the
same weights, with diagnostics of how the trained model uses its hint input.

    .venv/bin/python benchmarks/it3_sweep.py --seeds 0,1,2 --steps 4 \\
        --train '{}' --train '{"hint_dropout": 0.0}' \\
        --test '{}' --test '{"lr": 3e-4}' --test '{"_random": 1}'

--train / --test: JSON changes to the default IT3Config (training fields / test-time fields);
`{"_random": k}` in --test is a control: the IT3 gradient replaced by a fixed random direction
per batch (seed k). Protocol as benchmarks/engine_accuracy.py (0 = the full split);
--corruption/--severity pick the test shift, --test-offset skips the first test images (a
selection/confirmation split: --limit-test 5000 with offset 0, then offset 5000), --cache DIR
keeps trained weights per (training config, seed, train size) and reuses them.
Diagnostics on the noisy and the clean test set: accuracy of y0 = f(x, null), of
F(x, softmax y0), of f(x, one-hot true label), and how often f(x, one-hot c) follows a random c.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import build_engine, evaluate, load_data, train  # noqa: E402
from engines import IT3Config, IT3Engine  # noqa: E402


TEST_TIME = {"adapt_params", "steps", "lr", "optimizer", "batch_size", "mode", "adam_eps",
             "channels_last", "distance", "variant", "detach_target",
             "split_model"}  # not in the cache key
NEW_FIELDS = {"hint_dropout_mode": "fixed", "hint_shift": 0}  # in the key only when changed


def diagnose(engine: IT3Engine, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Accuracies (%) of the null pass, the hinted passes, and random-hint following."""
    c = engine.num_classes
    with torch.no_grad():
        p0 = engine.predict(x).softmax(1)                                    # (N, C)
        rand = torch.randint(c, (len(x),), generator=torch.Generator().manual_seed(0))
        hinted = {"F_y0": p0, "F_true": F.one_hot(y, c).float(),
                  "follows_rand": F.one_hot(rand, c).float()}
        out = {"y0": p0.argmax(1)}
        for name, hint in hinted.items():
            out[name] = engine._forward(x, engine.embedder(hint)).argmax(1)
    ref = {"follows_rand": rand}
    return {k: round(float((v == ref.get(k, y)).double().mean() * 100), 1)
            for k, v in out.items()}


def random_direction(engine: IT3Engine, seed: int) -> None:
    """Control: each batch descends a fixed random linear function of the adapted weights."""
    step_loss, gen, dirs = engine._step_loss, torch.Generator().manual_seed(seed), {}

    def fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pred, _ = step_loss(x)
        params = [p for _, p in engine.adapted_parameters()]
        if x.data_ptr() not in dirs:
            dirs.clear()
            dirs[x.data_ptr()] = [torch.randn(p.shape, generator=gen) for p in params]
        return pred, sum((r * p).sum() for r, p in zip(dirs[x.data_ptr()], params))

    engine._step_loss = fake


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", action="append", default=[])
    ap.add_argument("--test", action="append", default=[])
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--limit-train", type=int, default=0)
    ap.add_argument("--limit-test", type=int, default=0)
    ap.add_argument("--test-offset", type=int, default=0)
    ap.add_argument("--corruption", default="gaussian_noise")
    ap.add_argument("--severity", type=int, default=5)
    ap.add_argument("--cache", default="", help="directory for trained weights ('' = none)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    end = args.test_offset + args.limit_test if args.limit_test else None
    data = load_data("fashion-mnist", None, args.limit_train or None, end,
                     args.corruption, args.severity)
    data.x_test, data.y_test, data.x_clean = (t[args.test_offset:] for t in
                                              (data.x_test, data.y_test, data.x_clean))
    example = torch.zeros(1, 1, 28, 28)
    for train_json in args.train or ["{}"]:
        config = IT3Config().replace(**json.loads(train_json))
        for seed in [int(s) for s in args.seeds.split(",")]:
            engine = build_engine("it3", data.spec, seed, config)
            key = json.dumps({k: v for k, v in config.replace(seed=seed).to_dict().items()
                              if (k not in TEST_TIME or (k == "distance"
                                                         and not config.train_distance))
                              and NEW_FIELDS.get(k, object()) != v},
                             sort_keys=True)
            path = Path(args.cache or ".") / (
                f"it3_{hashlib.md5(key.encode()).hexdigest()[:10]}_{len(data.x_train)}.pt")
            if args.cache and path.exists():
                engine.load_state_dict(torch.load(path))
                engine.eval()
                info = {"seconds": 0.0}
            else:
                info = train(engine, data.x_train, data.y_train)
                if args.cache:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(engine.state_dict(), path)
            print(f"TRAIN {train_json} seed {seed} ({info['seconds']:.0f}s) noisy "
                  f"{diagnose(engine, data.x_test, data.y_test)} clean "
                  f"{diagnose(engine, data.x_clean, data.y_test)}", flush=True)
            for test_json in args.test or ["{}"]:
                changes = json.loads(test_json)
                rnd = changes.pop("_random", 0)
                other = IT3Engine(copy.deepcopy(engine.model), example, config.replace(**changes))
                other.load_state_dict(engine.state_dict())
                other.eval()
                if rnd:
                    random_direction(other, int(rnd))
                acc = evaluate(other, data.x_test, data.y_test, args.steps)
                k = min(other.config.steps, args.steps)
                print(f"   test {test_json}: " + " ".join(f"{a:.2f}" for a in acc)
                      + f"  (gain at step {k}: {acc[k] - acc[0]:+.2f})", flush=True)


if __name__ == "__main__":
    main()
