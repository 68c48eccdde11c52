"""Where TTT loses, and what the entropy gate does about it (issue 15's diagnosis).

    .venv/bin/python benchmarks/ttt_failures.py diagnose --seed 3
    .venv/bin/python benchmarks/ttt_failures.py gate --seed 4 --first 1000 --count 2000
    .venv/bin/python benchmarks/ttt_failures.py shortcut --seed 3
    .venv/bin/python benchmarks/ttt_failures.py stepsize --seed 3

`diagnose` (test labels used to understand, never to choose a default): for the clean images
and a few severity-5 corruptions, the accuracy after steps 0..3 of TTT's defaults, the rotation
loss each step descended, the rotation head's accuracy on the unadapted model, and the cosine
between the rotation-loss gradient and the (oracle) cross-entropy gradient at step 0.

`shortcut`: content-free images (uniform noise) with and without motion blur. Online TTT on
512 of them, then the rotation head's accuracy on 512 others: if it rises far above chance
(25 %), the rotation task is solvable from the corruption alone, with no content to learn.

`stepsize` (diagnosis on test labels): the gain after steps 1, 3, 5 for Adam and SGD at lr
1e-2 and 1e-3 on the diagnosed corruptions: whether a smaller step removes the losses.

`gate`: every corruption at severities 3 and 5 on test images [first, first + count), the gain of
step 3 without and with `gate="entropy"` (per sample), and per batch (step 3 only if the batch's
mean entropy fell). Seed-CNN TTT trained on the full Fashion-MNIST train split with the config's
recipe; the trained engine is cached in --cache by seed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engines  # noqa: E402
from engines.hooks import capture_output  # noqa: E402
from engines.ttt import rotate_batch  # noqa: E402
from pipeline.corruptions import corrupt, list_corruptions  # noqa: E402
from pipeline.datasets import load_split, to_float  # noqa: E402
from _common import build_engine, train  # noqa: E402

DIAGNOSED = ["motion_blur", "translate", "rotate", "gaussian_noise", "shot_noise", "glass_blur",
             "fog"]


def trained_engine(seed: int, cache: str, data_dir: str | None) -> engines.Engine:
    tr = load_split("fashion-mnist", "train", data_dir=data_dir)
    engine = build_engine("ttt", tr.spec, seed, engines.get_engine("ttt").config_cls())
    path = Path(cache) / f"ttt-fashion-mnist-seed{seed}.pt"
    if path.exists():
        engine.load_state_dict(torch.load(path, weights_only=True))
    else:
        train(engine, torch.from_numpy(to_float(tr.images)), torch.from_numpy(tr.labels))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(engine.state_dict(), path)
    return engine.eval()


def test_images(first: int, count: int, data_dir: str | None):
    te = load_split("fashion-mnist", "test", data_dir=data_dir)
    return (to_float(te.images[first:first + count]), torch.from_numpy(te.labels[first:first + count]),
            np.arange(first, first + count), te.spec.std[0])


def _corrupted(clean, name, severity, ids, std, seed):
    return torch.from_numpy(clean if name == "identity" else
                            corrupt(clean, name, severity, ids, seed=seed, norm_std=std))


def diagnose(engine: engines.Engine, args) -> None:
    clean, y, ids, std = test_images(args.first, args.count, args.data_dir)
    params = [p for _, p in engine.adapted_parameters()]
    for name in ["identity", *DIAGNOSED]:
        x = _corrupted(clean, name, 5, ids, std, args.corruption_seed)
        acc, losses, cos = np.zeros(4), np.zeros(3), []
        for i in range(0, len(x), 32):
            xb, yb = x[i:i + 32], y[i:i + 32]
            result = engine.adapt(xb, steps=3)
            acc += (result.logits.argmax(-1) == yb).sum(1).numpy()
            losses += result.losses.numpy() * len(xb)
            g_rot = torch.autograd.grad(engine._rotation_forward(xb)[1], params, allow_unused=True)
            g_ce = torch.autograd.grad(F.cross_entropy(engine.model(xb), yb), params,
                                       allow_unused=True)
            flat = [torch.cat([(torch.zeros_like(p) if g is None else g).flatten()
                               for p, g in zip(params, gs)]) for gs in (g_rot, g_ce)]
            cos.append(float(F.cosine_similarity(*flat, dim=0)))
        print(f"{name:15s} acc/step {np.round(acc / len(x) * 100, 1)}  rotation loss/step "
              f"{np.round(losses / len(x), 2)}  rotation head acc "
              f"{_rotation_accuracy(engine, x):5.1f}  "
              f"cos(grad rot, grad CE) {np.mean(cos):+.2f}", flush=True)


def gate(engine: engines.Engine, args) -> None:
    clean, y, ids, std = test_images(args.first, args.count, args.data_dir)
    cells = [("identity", 0)] + [(c, s) for c in list_corruptions() for s in (3, 5)]
    gains: dict[str, list[float]] = {"step 3": [], "gate per batch": [], "gate (per sample)": []}
    for name, severity in cells:
        x = _corrupted(clean, name, severity, ids, std, args.corruption_seed)
        hits = dict.fromkeys(["step 0", *gains], 0)
        for i in range(0, len(x), 32):
            xb, yb = x[i:i + 32], y[i:i + 32]
            logits = engine.adapt(xb, steps=3).logits                  # (4, B, C)
            logp = logits.log_softmax(-1)
            entropy = -(logp.exp() * logp).sum(-1)                     # (4, B)
            right = logits.argmax(-1) == yb
            hits["step 0"] += int(right[0].sum())
            hits["step 3"] += int(right[3].sum())
            batch_keeps = entropy[3].mean() < entropy[0].mean()
            hits["gate per batch"] += int((right[3] if batch_keeps else right[0]).sum())
            gated = engines.entropy_gate(logits).argmax(-1) == yb
            hits["gate (per sample)"] += int(gated[3].sum())
        acc = {k: 100 * v / len(x) for k, v in hits.items()}
        print(f"{name:15s} s{severity}  unadapted {acc['step 0']:5.1f}  " + "  ".join(
            f"{k} {acc[k] - acc['step 0']:+5.1f}" for k in gains), flush=True)
        if name != "identity":
            for k in gains:
                gains[k].append(acc[k] - acc["step 0"])
    for k, values in gains.items():
        g = np.array(values)
        print(f"mean over {len(g)} corrupted cells, {k:18s}: {g.mean():+.2f}  "
              f"cells below -1: {int((g < -1).sum())}  worst {g.min():+.1f}")


def shortcut(engine: engines.Engine, args) -> None:
    rng = np.random.default_rng(args.corruption_seed)
    noise = rng.uniform(0, 1, size=(1024, 1, 28, 28)).astype(np.float32)
    blurred = corrupt(noise, "motion_blur", 5, np.arange(1024), seed=args.corruption_seed,
                      norm_std=engine.model.normalize.std.item())
    start = {k: v.clone() for k, v in engine.state_dict().items()}
    for name, x in (("uniform noise", noise), ("motion-blurred noise", blurred)):
        engine.load_state_dict(start)
        x = torch.from_numpy(x)
        before = _rotation_accuracy(engine, x[512:])
        for i in range(0, 512, 32):                  # online: the adapted weights carry over
            engine.adapt(x[i:i + 32], steps=3, mode="online")
        print(f"{name:22s} rotation head accuracy on 512 unseen images: {before:5.1f} -> "
              f"{_rotation_accuracy(engine, x[512:]):5.1f} % after online TTT on 512 others")
    engine.load_state_dict(start)


def stepsize(engine: engines.Engine, args) -> None:
    clean, y, ids, std = test_images(args.first, args.count, args.data_dir)
    sets = {name: _corrupted(clean, name, 5, ids, std, args.corruption_seed)
            for name in ["identity", *DIAGNOSED]}
    state = engine.state_dict()
    for optimizer, lr in (("adam", 1e-2), ("adam", 1e-3), ("sgd", 1e-2), ("sgd", 1e-3)):
        probe = build_engine("ttt", engine_spec(args), args.seed,
                             engine.config.replace(optimizer=optimizer, lr=lr))
        probe.load_state_dict(state)
        probe.eval()
        cells = []
        for name, x in sets.items():
            hits = np.zeros(6)
            for i in range(0, len(x), 32):
                logits = probe.adapt(x[i:i + 32], steps=5).logits
                hits += (logits.argmax(-1) == y[i:i + 32]).sum(1).numpy()
            acc = 100 * hits / len(x)
            cells.append(f"{name[:10]} {acc[0]:.1f} {acc[1] - acc[0]:+.1f}/{acc[3] - acc[0]:+.1f}/"
                         f"{acc[5] - acc[0]:+.1f}")
        print(f"{optimizer} lr {lr:g} (unadapted, gain after steps 1/3/5): " + " | ".join(cells),
              flush=True)


def engine_spec(args):
    return load_split("fashion-mnist", "train", data_dir=args.data_dir).spec


def _rotation_accuracy(engine: engines.Engine, x: torch.Tensor) -> float:
    with torch.no_grad():
        rotated, labels = rotate_batch(x)
        with capture_output(engine.model.get_submodule(engine.layer_name)) as store:
            engine.model(rotated)
        return float((engine.head(store.output).argmax(1) == labels).double().mean() * 100)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("what", choices=("diagnose", "gate", "shortcut", "stepsize"))
    ap.add_argument("--seed", type=int, default=3, help="training seed")
    ap.add_argument("--first", type=int, default=0, help="first test image")
    ap.add_argument("--count", type=int, default=1000, help="number of test images")
    ap.add_argument("--corruption-seed", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/ttt-pipe/bench"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = trained_engine(args.seed, args.cache, args.data_dir)
    {"diagnose": diagnose, "gate": gate, "shortcut": shortcut,
     "stepsize": stepsize}[args.what](engine, args)


if __name__ == "__main__":
    main()
