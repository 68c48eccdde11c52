"""Batched vs sequential episodes on CPU (engines/batched.py): samples/s and the ratio.

    .venv/bin/python benchmarks/episodes_speed.py                    # 1 and 2 torch threads
    .venv/bin/python benchmarks/episodes_speed.py --threads 1 --repeats 5 --methods ttt

Two workloads per (model, method), on random pixel-unit images (speed only: the weights are a
fresh init, the values are checked against the sequential path, not for accuracy):
  batch      - G = 8 episodic batches of 32 images, `--steps` steps (default 3): eight
               `engine.adapt(xs[g])` calls vs one `engine.adapt_episodes(xs)`;
  per-sample - the TTT paper's protocol: 32 images, each adapted alone on 32 augmented copies
               (`adapt_per_sample`, copy 0 the image itself), SGD (momentum 0.9) lr 1e-3,
               `--sample-steps` steps (default 10), TTT with random rotation labels
               (rotations="rand"); episodes=1 (one image at a time) vs episodes=32.
Models: seed_cnn (1x28x28) and resnet26 (3x32x32) when `pipeline.models.list_models()` has it.
Timed after one warm-up run; best of `--repeats` interleaved rounds. The machine's load
average is printed with the numbers (the benchmark machine is shared).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engines  # noqa: E402
from engines.batched import adapt_per_sample  # noqa: E402
from pipeline import models  # noqa: E402

G, BATCH, COPIES, IMAGES = 8, 32, 32, 32
LAYERS = {"seed_cnn": {"ttt": "fc2", "it3": "fc1"}}


def _model(name: str) -> tuple[torch.nn.Module, tuple[int, int, int]]:
    torch.manual_seed(0)
    if name == "seed_cnn":
        return models.build_model(name), (1, 28, 28)
    return models.build_model(name, num_classes=10), (3, 32, 32)


def _layer(model: str, method: str) -> str:
    if model in LAYERS:
        return LAYERS[model][method]
    default_layer = getattr(models, "default_layer", None)
    layer = default_layer(model, method) if default_layer else None
    if not layer:
        raise SystemExit(f"no default {method} layer known for {model}; add it to LAYERS")
    return layer


def _engine(model_name: str, method: str, **config) -> tuple[engines.Engine, tuple]:
    model, shape = _model(model_name)
    cls = engines.get_engine(method)
    cfg = cls.config_cls(layer=_layer(model_name, method), **config)
    engine = cls(model, torch.zeros(1, *shape), cfg)
    engine.eval()
    return engine, shape


def _best(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up (also the batched path's one-time vmap check)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _interleaved(seq, bat, repeats: int) -> tuple[float, float, object, object]:
    seq()
    bat()
    t_seq = t_bat = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        r_seq = seq()
        t1 = time.perf_counter()
        r_bat = bat()
        t2 = time.perf_counter()
        t_seq, t_bat = min(t_seq, t1 - t0), min(t_bat, t2 - t1)
    return t_seq, t_bat, r_seq, r_bat


def bench_batch(model_name: str, method: str, steps: int, repeats: int) -> dict:
    engine, shape = _engine(model_name, method, steps=steps)
    xs = torch.rand(G, BATCH, *shape, generator=torch.Generator().manual_seed(1))

    def seq():
        return torch.stack([engine.adapt(x).logits for x in xs], 1)    # (K+1, G, B, C)

    def bat():
        return engine.adapt_episodes(xs).logits

    t_seq, t_bat, a, b = _interleaved(seq, bat, repeats)
    return {"workload": f"batch {BATCH} x G={G}, {steps} steps", "samples": G * BATCH,
            "seq_s": t_seq, "bat_s": t_bat, "diff": (a - b).abs().max().item()}


def bench_per_sample(model_name: str, steps: int, repeats: int) -> dict:
    engine, shape = _engine(model_name, "ttt", steps=steps, lr=1e-3, optimizer="sgd",
                            rotations="rand")
    x = torch.rand(IMAGES, *shape, generator=torch.Generator().manual_seed(2))
    seeds = list(range(IMAGES))

    def run(episodes: int):
        return lambda: adapt_per_sample(engine, x, COPIES, seeds, episodes=episodes).logits

    t_seq, t_bat, a, b = _interleaved(run(1), run(IMAGES), repeats)
    return {"workload": f"per-sample {IMAGES} images x {COPIES} copies, {steps} SGD steps",
            "samples": IMAGES, "seq_s": t_seq, "bat_s": t_bat,
            "diff": (a - b).abs().max().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--sample-steps", type=int, default=10)
    ap.add_argument("--methods", default="ttt,it3")
    ap.add_argument("--models", default="seed_cnn,resnet26",
                    help="models to run; those not in pipeline.models.list_models() are skipped")
    args = ap.parse_args()
    available = models.list_models()
    names = [m for m in args.models.split(",") if m in available]
    skipped = [m for m in args.models.split(",") if m not in available]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; skipped (not in the zoo): "
          f"{', '.join(skipped) or '-'}")
    print(f"{'threads':>7} {'model':<10} {'method':<6} {'workload':<48} {'seq s':>8} "
          f"{'batched s':>9} {'ratio':>6} {'samples/s seq->bat':>20} {'max|diff|':>9} load")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for model_name in names:
            rows = [(m, bench_batch(model_name, m, args.steps, args.repeats))
                    for m in args.methods.split(",")]
            if "ttt" in args.methods.split(","):
                rows.append(("ttt", bench_per_sample(model_name, args.sample_steps,
                                                     args.repeats)))
            for method, r in rows:
                load = os.getloadavg()[0]
                print(f"{threads:>7} {model_name:<10} {method:<6} {r['workload']:<48} "
                      f"{r['seq_s']:>8.3f} {r['bat_s']:>9.3f} {r['seq_s'] / r['bat_s']:>5.2f}x "
                      f"{r['samples'] / r['seq_s']:>9.0f} -> {r['samples'] / r['bat_s']:<8.0f} "
                      f"{r['diff']:>9.1e} {load:.2f}", flush=True)


if __name__ == "__main__":
    main()
