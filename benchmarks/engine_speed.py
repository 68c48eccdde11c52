"""Our engines vs torch-ttt 0.0.2, one process, identical inputs and weights.

    .venv/bin/pip install --no-deps torch-ttt==0.0.2 einops      # the optional `bench` extra
    .venv/bin/python benchmarks/engine_speed.py                   # TTT and IT3, 512 samples
    .venv/bin/python benchmarks/engine_speed.py --method ttt --n 1024 --repeats 5

For each method: a briefly trained seed network (our engine's joint training on `--train`
clean images; the weights only make the predictions meaningful) is deep-copied into torch-ttt's
engine after one forward has built its lazy head/embedder, and the head/embedder weights are
copied in too. Inputs: the first `--n` Fashion-MNIST test images + gaussian_noise severity 5.
Timed after one warm-up pass (best of `--repeats` interleaved rounds, each over all batches):
  sweep  - predictions after 0,1,2,3 steps: one anytime `adapt(x, 3)` for us, four runs
           (num_steps = 0, 1, 2, 3) for torch-ttt;
  3-step - the prediction after 3 steps only.
IT3 runs our `variant="torch_ttt"` (the algorithm torch-ttt implements) with MSE between
softmaxes on both sides; torch-ttt gets the model wrapped with a softmax output (as in its IT3
tutorial and our parity test), since its engine embeds the raw model output y0 and compares
raw outputs. TTT adapts every model parameter with Adam on both sides. torch-ttt gets the
model in the default (contiguous) layout; ours converts its conv weights to channels_last
(config `channels_last`, default True) — `--ref-channels-last` gives torch-ttt that too.
FLOPs: torch.utils.flop_counter.FlopCounterMode over one 3-step batch; the CPU peak is
cores x clock x FP32 FLOP/cycle from lscpu (32 with AVX2+FMA: two 256-bit FMA pipes, 64 with
AVX-512 FMA) — an upper bound that tiny convolutions never approach.
"""

from __future__ import annotations

import argparse
import copy
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engines  # noqa: E402
from _common import apply_sets, build_engine, load_data, train  # noqa: E402

STEPS = 3


def cpu_peak(threads: int) -> tuple[float, str]:
    """Peak FP32 GFLOP/s for `threads` cores, from lscpu (flags, clock)."""
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    flags = set(re.search(r"Flags:\s*(.*)", text).group(1).split()) if "Flags:" in text else set()
    mhz = re.search(r"CPU max MHz:\s*([\d.]+)", text) or re.search(r"CPU MHz:\s*([\d.]+)", text)
    if mhz:
        ghz, how = float(mhz.group(1)) / 1000, "lscpu MHz"
    else:  # VMs often hide the clock; BogoMIPS is 2x the TSC clock on x86
        bogo = re.search(r"BogoMIPS:\s*([\d.]+)", text)
        ghz, how = (float(bogo.group(1)) / 2000 if bogo else 2.0), "BogoMIPS/2"
    per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 16
    cores = threads
    peak = cores * ghz * per_cycle
    return peak, (f"{cores} core(s) x {ghz:.2f} GHz ({how}) x {per_cycle} FP32 FLOP/cycle "
                  f"({'AVX-512' if per_cycle == 64 else 'AVX2+FMA' if per_cycle == 32 else 'SSE'})")


class _Softmax(nn.Module):
    """The model with a softmax output: torch-ttt's IT3 embeds and compares the model's outputs
    as they are; our variant="torch_ttt" reproduces its tutorial, whose model ends in softmax."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.net = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).softmax(1)


def reference_engine(method: str, ours: engines.Engine, example: torch.Tensor,
                     channels_last: bool = False):
    """torch-ttt's engine on a deep copy of our model, its lazy part built then overwritten.
    The copy gets the default (contiguous) layout, as a user's model has, unless
    `channels_last`. Building the lazy part takes one train-mode forward, which moves
    BatchNorm's running statistics (two momentum updates); the copy's state is restored after
    it, so both sides start from the same buffers (benchmarks/README.md, "ResNet-26 vs
    torch-ttt")."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = copy.deepcopy(ours.model).to(memory_format=fmt)
    state = copy.deepcopy(model.state_dict())
    if method == "ttt":
        from torch_ttt.engine.ttt_engine import TTTEngine
        ref = TTTEngine(model, ours.config.layer, optimization_parameters={})
        ref.train()
        ref(example)                                  # builds angle_head
        ref.angle_head.load_state_dict(ours.head.state_dict())
    else:
        from torch_ttt.engine.it3_engine import IT3Engine
        ref = IT3Engine(_Softmax(model), f"net.{ours.config.layer}", optimization_parameters={},
                        distance_fn=F.mse_loss)       # both sides: MSE between softmaxes
        ref.train()
        ref(example)                                  # builds embeder
        ref.embeder.load_state_dict(ours.embedder.state_dict())
    model.load_state_dict(state)                      # undo that forward's BatchNorm updates
    ref.to(memory_format=fmt)
    ref.eval()
    return ref


def run_ref(ref, batches, steps: int, lr: float) -> list[torch.Tensor]:
    ref.optimization_parameters = {"num_steps": steps, "lr": lr, "optimizer_name": "adam",
                                   "copy_model": True}
    return [ref(x)[0].detach() for x in batches]


def run_ours(engine, batches, steps: int) -> list[torch.Tensor]:
    return [engine.adapt(x, steps=steps).logits for x in batches]


def best_times(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Best-of-`repeats` seconds and last output of each fn, the fns interleaved in every
    round (a shared machine's slow spells then hit all of them alike)."""
    best, out = {k: float("inf") for k in fns}, {}
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            out[key] = fn()
            best[key] = min(best[key], time.perf_counter() - t0)
    return best, out


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding,
                         _dilation, transposed, _output_padding, _groups, output_mask,
                         out_shape=None, **kwargs) -> int:
    """A convolution's backward: its forward's multiplies once per gradient computed (input,
    weight). torch's own formula counts a grouped convolution's input gradient as if it were
    not grouped (groups x too many; the rotation fold's grouped convs made that show)."""
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def flops_of(fn) -> int:
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten.convolution_backward: _conv_backward_flops})
    with counter:
        fn()
    return counter.get_total_flops()


def bench(method: str, args, data) -> None:
    cfg = engines.get_engine(method).config_cls()
    if method == "it3":  # the algorithm torch-ttt implements (its tutorial), MSE distance
        cfg = engines.IT3Config.tutorial(distance="mse")
    cfg = apply_sets(cfg, args.set)
    ours = build_engine(method, data.spec, 0, cfg)
    info = train(ours, data.x_train, data.y_train)
    bs, lr = cfg.batch_size, cfg.lr
    x, y = data.x_test[:args.n], data.y_test[:args.n]
    batches = [x[i:i + bs] for i in range(0, len(x), bs)]
    ref = reference_engine(method, ours, batches[0], args.ref_channels_last)
    run_ours(ours, batches, STEPS), run_ref(ref, batches, STEPS, lr)        # warm-up
    n = len(x)

    t, out = best_times({
        "ours_sweep": lambda: run_ours(ours, batches, STEPS),
        "ref_sweep": lambda: [run_ref(ref, batches, k, lr) for k in range(STEPS + 1)],
        "ours_3": lambda: run_ours(ours, batches, STEPS),
        "ref_3": lambda: run_ref(ref, batches, STEPS, lr)}, args.repeats)
    t_ours_sweep, t_ref_sweep, t_ours_3, t_ref_3 = (
        t["ours_sweep"], t["ref_sweep"], t["ours_3"], t["ref_3"])
    ours_out, ref_out = out["ours_sweep"], out["ref_sweep"]

    ours_pred = torch.cat(ours_out, 1).argmax(-1)                        # (K+1, N)
    ref_pred = torch.stack([torch.cat(r).argmax(-1) for r in ref_out])  # (K+1, N)
    print(f"\n## {method.upper()} — {n} noisy samples, batch {bs}, Adam lr {lr:g}, "
          f"{torch.get_num_threads()} thread(s); model trained {info['seconds']:.0f}s on "
          f"{len(data.x_train)} images; ours: channels_last={cfg.channels_last}"
          f"{' (--set ' + ' '.join(args.set) + ')' if args.set else ''}, torch-ttt: channels_last="
          f"{args.ref_channels_last}")
    print("| step | ours acc % | torch-ttt acc % | same prediction % |\n|---|---|---|---|")
    for k in range(STEPS + 1):
        a = (ours_pred[k] == y).double().mean() * 100
        b = (ref_pred[k] == y).double().mean() * 100
        same = (ours_pred[k] == ref_pred[k]).double().mean() * 100
        print(f"| {k} | {a:.2f} | {b:.2f} | {same:.2f} |")

    xb = batches[0]
    f_ours = flops_of(lambda: ours.adapt(xb, steps=STEPS)) / len(xb)
    f_ref = flops_of(lambda: run_ref(ref, [xb], STEPS, lr)) / len(xb)
    peak, how = cpu_peak(torch.get_num_threads())
    print("\n| run | ours samples/s | torch-ttt samples/s | speed-up | target |\n|---|---|---|---|---|")
    print(f"| sweep 0..{STEPS} | {n / t_ours_sweep:,.0f} | {n / t_ref_sweep:,.0f} | "
          f"{t_ref_sweep / t_ours_sweep:.2f}x | >= 4x |")
    print(f"| {STEPS}-step run | {n / t_ours_3:,.0f} | {n / t_ref_3:,.0f} | "
          f"{t_ref_3 / t_ours_3:.2f}x | >= 1.5x |")
    print(f"\nFLOPs per sample, one {STEPS}-step run: ours {f_ours / 1e6:.1f} M, torch-ttt "
          f"{f_ref / 1e6:.1f} M. Achieved: ours {f_ours * n / t_ours_3 / 1e9:.2f} GFLOP/s, "
          f"torch-ttt {f_ref * n / t_ref_3 / 1e9:.2f} GFLOP/s; peak {peak:.0f} GFLOP/s = {how}.")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--method", choices=("ttt", "it3", "both"), default="both")
    ap.add_argument("--dataset", default="fashion-mnist", choices=("fashion-mnist", "mnist"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--n", type=int, default=512, help="noisy test samples timed")
    ap.add_argument("--train", type=int, default=10000, help="clean images to pre-train on")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ref-channels-last", action="store_true",
                    help="give torch-ttt a channels_last copy of the model too (ours converts "
                         "its own by default; config channels_last)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field of our engine's config (JSON value), e.g. "
                         "channels_last=false")
    args = ap.parse_args(argv)
    try:
        import torch_ttt  # noqa: F401
    except ImportError:
        sys.exit("torch-ttt is missing: .venv/bin/pip install --no-deps torch-ttt==0.0.2 einops")
    torch.set_num_threads(args.threads)
    data = load_data(args.dataset, args.data_dir, args.train, args.n)
    for method in (["ttt", "it3"] if args.method == "both" else [args.method]):
        bench(method, args, data)


if __name__ == "__main__":
    main()
