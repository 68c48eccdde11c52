"""TTT and IT3 adaptation speed on `resnet26` (the TTT paper's ResNet-26, GroupNorm(8) and
BatchNorm) at 32x32, batch 64: ours vs torch-ttt 0.0.2, one process, identical weights and inputs.

    .venv/bin/pip install --no-deps torch-ttt==0.0.2 einops      # the optional `bench` extra
    .venv/bin/python benchmarks/resnet26_speed.py                 # both methods, both norms
    .venv/bin/python benchmarks/resnet26_speed.py --method ttt --norm group --n 256 --repeats 3

Weights: resnet26 (seeded init) jointly trained with our engine's auxiliary part for
`--train-steps` Adam steps on seeded random images (this machine has no CIFAR-10; the steps
only move the weights, the head and BatchNorm's statistics away from their init). torch-ttt
gets a deep copy of the model and our head/embedder weights (benchmarks/engine_speed.py's
`reference_engine`). Inputs: `--n` seeded uniform images in [0, 1], batches of `--batch`.
TTT: the head at layer2 (the paper's), every parameter adapted with Adam on both sides, and
`--gate none` (default; torch-ttt has no gate — `--gate entropy`, our TTT default, puts step 0's
row back wherever a step is not less uncertain, which torch-ttt never does). IT3:
our `variant="torch_ttt"` (torch-ttt's algorithm, its tutorial) with MSE between softmaxes at
layer1. Timed after one warm-up pass, best of `--repeats` interleaved rounds:
  sweep  - predictions after 0..3 steps: one anytime `adapt(x, 3)` for us, four runs for torch-ttt;
  3-step - the prediction after 3 steps only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engines  # noqa: E402
from engine_speed import best_times, reference_engine, run_ours, run_ref  # noqa: E402
from pipeline.models import build_model, default_layer  # noqa: E402

STEPS = 3


def build(method: str, norm: str, train_steps: int, batch: int, gate: str = "none"):
    torch.manual_seed(0)
    model = build_model("resnet26", norm=norm)
    layer = default_layer("resnet26", method)
    if method == "ttt":
        cfg = engines.TTTConfig(layer=layer, gate=gate)
    else:
        cfg = engines.IT3Config.tutorial(distance="mse", layer=layer)
    gen = torch.Generator().manual_seed(1)
    ours = engines.get_engine(method)(model, torch.rand(1, 3, 32, 32, generator=gen), cfg)
    optimizer = torch.optim.Adam(ours.parameters(), lr=1e-3)
    ours.train()
    for _ in range(train_steps):
        x = torch.rand(batch, 3, 32, 32, generator=gen)
        y = torch.randint(10, (batch,), generator=gen)
        loss, _, _ = ours.joint_loss(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ours.eval()
    return ours, cfg


def bench(method: str, norm: str, args) -> dict:
    ours, cfg = build(method, norm, args.train_steps, args.batch, args.gate)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(args.n, 3, 32, 32, generator=gen)
    batches = [x[i:i + args.batch] for i in range(0, len(x), args.batch)]
    ref = reference_engine(method, ours, batches[0])
    lr = cfg.lr
    run_ours(ours, batches, STEPS), run_ref(ref, batches, STEPS, lr)  # warm-up
    t, out = best_times({
        "ours_sweep": lambda: run_ours(ours, batches, STEPS),
        "ref_sweep": lambda: [run_ref(ref, batches, k, lr) for k in range(STEPS + 1)],
        "ours_3": lambda: run_ours(ours, batches, STEPS),
        "ref_3": lambda: run_ref(ref, batches, STEPS, lr)}, args.repeats)
    ours_pred = torch.cat(out["ours_sweep"], 1).argmax(-1)                        # (K+1, N)
    ref_pred = torch.stack([torch.cat(r).argmax(-1) for r in out["ref_sweep"]])  # (K+1, N)
    ours3 = torch.cat(out["ours_3"], 1)[-1].argmax(-1)
    ref3 = torch.cat(out["ref_3"]).argmax(-1)
    same = [(ours_pred[k] == ref_pred[k]).double().mean().item() * 100 for k in range(STEPS + 1)]
    row = {"method": method, "norm": norm, "n": args.n,
           "sweep": (args.n / t["ours_sweep"], args.n / t["ref_sweep"], t["ref_sweep"] / t["ours_sweep"]),
           "three": (args.n / t["ours_3"], args.n / t["ref_3"], t["ref_3"] / t["ours_3"]),
           "same": same, "same3": (ours3 == ref3).double().mean().item() * 100}
    print(f"| {method} | {norm} | {row['sweep'][0]:.1f} | {row['sweep'][1]:.1f} | {row['sweep'][2]:.2f}x | "
          f"{row['three'][0]:.1f} | {row['three'][1]:.1f} | {row['three'][2]:.2f}x | "
          f"{' / '.join(f'{s:.1f}' for s in same)} | {row['same3']:.1f} |", flush=True)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--method", choices=("ttt", "it3", "both"), default="both")
    ap.add_argument("--norm", choices=("group", "batch", "both"), default="both")
    ap.add_argument("--n", type=int, default=128, help="images timed")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gate", choices=("none", "entropy"), default="none",
                    help="our TTT's gate (torch-ttt has none; IT3's tutorial config: none)")
    args = ap.parse_args(argv)
    try:
        import torch_ttt  # noqa: F401
    except ImportError:
        sys.exit("torch-ttt is missing: .venv/bin/pip install --no-deps torch-ttt==0.0.2 einops")
    torch.set_num_threads(args.threads)
    print(f"resnet26 at 32x32, batch {args.batch}, {args.n} images, {torch.get_num_threads()} thread(s), "
          f"best of {args.repeats}; samples/s (ours | torch-ttt | speed-up); same prediction % at steps 0..3")
    print("| method | norm | sweep ours | sweep torch-ttt | sweep x | 3-step ours | 3-step torch-ttt | "
          "3-step x | same % steps 0/1/2/3 (sweep) | same % (3-step) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method in (["ttt", "it3"] if args.method == "both" else [args.method]):
        for norm in (["group", "batch"] if args.norm == "both" else [args.norm]):
            bench(method, norm, args)


if __name__ == "__main__":
    main()
