"""`train --init CKPT --train aux|all` vs joint training from scratch: the helpers of the trade-off
measurement (README / notes: Fashion-MNIST, TTT on seed_cnn and seed_cnn_bn).

    plain  OUT.pt --model seed_cnn_bn   a plain CE model (1 epoch, Adam lr 1e-2, batch 64, seed 0:
                                        the trainer's TTT recipe without the rotation task), saved
                                        as a state_dict for `ttt-pipe import-model`
    cpu    SOURCE_CKPT                  process CPU time per training batch, --train all vs aux,
                                        ttt and it3, interleaved, 1 torch thread (robust to the
                                        shared VM's load, unlike wall time)
    table  CKPT=RESULTS ...             accuracy before / after TTT per corruption, as markdown

The whole measurement (D = the Fashion-MNIST folder, O = an output folder):

    PY="nice -n 10 .venv/bin/python -m jobs.cli"
    nice -n 10 .venv/bin/python benchmarks/train_init.py plain $O/plain.pt --model seed_cnn_bn --data-dir $D
    $PY import-model --model seed_cnn_bn --weights $O/plain.pt --dataset fashion-mnist --out $O/source
    $PY train --method ttt --init $O/source --train aux --epochs 1 --data-dir $D --out $O/aux
    $PY train --method ttt --init $O/source --train all --epochs 1 --data-dir $D --out $O/all
    $PY train --method ttt --model seed_cnn_bn --dataset fashion-mnist --data-dir $D --epochs 1 --out $O/joint
    $PY corrupt --dataset fashion-mnist --data-dir $D --identity --severities 5 --limit 2000 \\
        --corruptions gaussian_noise,shot_noise,motion_blur,fog,zigzag --out $O/shards
    for c in aux all joint; do $PY adapt --checkpoint $O/$c --shards $O/shards --out $O/results/$c --actors 1; done
    .venv/bin/python benchmarks/train_init.py table $O/aux=$O/results/aux $O/all=$O/results/all $O/joint=$O/results/joint
    nice -n 10 .venv/bin/python benchmarks/train_init.py cpu $O/source --data-dir $D
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("MKL_CBWR", "AUTO")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DATASET = "fashion-mnist"


def _split(data_dir: str | None, n: int | None = None):
    from pipeline.datasets import load_split

    split = load_split(DATASET, "train", data_dir=data_dir)
    images, labels = torch.from_numpy(split.images), torch.from_numpy(split.labels)
    return (images, labels) if n is None else (images[:n], labels[:n])


def plain(out: str, model: str, data_dir: str | None) -> None:
    from pipeline.datasets import get_dataset
    from pipeline.model_spec import build_model_from_spec, resolve_model_spec

    torch.manual_seed(0)
    net = build_model_from_spec(resolve_model_spec(model, get_dataset(DATASET)))
    images, labels = _split(data_dir)
    from pipeline.training.data import to_pixels

    x = to_pixels(images)                                              # (N, C, H, W) pixel units
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    net.train()
    for b in range(0, len(labels), 64):
        rows = order[b:b + 64]
        loss = F.cross_entropy(net(x[rows]), labels[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(net.state_dict(), out)
    print(f"{out}: {model}, last batch loss {loss.item():.4f}")


def cpu(source: str, data_dir: str | None, batches: int, repeats: int) -> None:
    import engines
    from pipeline.checkpoint import build_model_from_checkpoint, load_checkpoint
    from pipeline.model_spec import layer_for, make_engine
    from pipeline.training import Batches, EpochLoop, TrainRecipe
    from pipeline.training.data import to_pixels

    ckpt = load_checkpoint(source)
    images, labels = _split(data_dir, 64 * batches)
    data = Batches(images, labels, torch.device("cpu"))
    print("| method | scope | ms CPU / batch of 64 | images / CPU-s |\n|---|---|---|---|")
    for method in ("ttt", "it3"):
        for scope in ("all", "aux") * repeats:
            model = build_model_from_checkpoint(ckpt)
            config = engines.get_engine(method).config_cls(layer=layer_for(ckpt.model_name, method, None))
            engine = make_engine(method, model, to_pixels(images[:1]), config, ckpt.model_name)
            frozen = ()
            if scope == "aux":
                engine.model.requires_grad_(False)
                frozen = (engine.model,)
            loop = EpochLoop(engine, TrainRecipe(lr=1e-3), data, None, epochs=1, batch_size=64,
                             seed=0, frozen=frozen)
            start = time.process_time()
            loop.run(batches)
            seconds = time.process_time() - start
            print(f"| {method} | {scope} | {seconds / batches * 1000:.1f} | {64 * batches / seconds:.0f} |",
                  flush=True)


def table(pairs: list[str]) -> None:
    import pyarrow.parquet as pq

    header = None
    for pair in pairs:
        ckpt, results = pair.split("=", 1)
        acc = pq.read_table(os.path.join(results, "accuracy.parquet")).to_pylist()
        last = max(r["step"] for r in acc)
        get = {(r["corruption"], r["step"]): r["accuracy"] for r in acc}
        corr = sorted({r["corruption"] for r in acc} - {"identity"})
        if header is None:
            header = corr
            print("| checkpoint | train | epochs | seconds | clean | " + " | ".join(corr)
                  + " | mean corrupted |\n|---|---|---|---|---|" + "---|" * (len(corr) + 1))
        training = json.load(open(os.path.join(ckpt, "manifest.json")))["training"]
        cells = [f"{100 * get[c, 0]:.1f} / {100 * get[c, last]:.1f}" for c in ["identity", *corr]]
        means = [sum(get[c, s] for c in corr) / len(corr) for s in (0, last)]
        cells.append(f"{100 * means[0]:.1f} / {100 * means[1]:.1f}")
        print(f"| {os.path.basename(ckpt.rstrip('/'))} | {training.get('train')} | {training['epochs']} "
              f"| {training['seconds']:.0f} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plain")
    p.add_argument("out")
    p.add_argument("--model", default="seed_cnn_bn")
    p.add_argument("--data-dir")
    c = sub.add_parser("cpu")
    c.add_argument("source")
    c.add_argument("--data-dir")
    c.add_argument("--batches", type=int, default=200)
    c.add_argument("--repeats", type=int, default=2)
    t = sub.add_parser("table")
    t.add_argument("pairs", nargs="+", help="CKPT=RESULTS")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.command == "plain":
        plain(args.out, args.model, args.data_dir)
    elif args.command == "cpu":
        cpu(args.source, args.data_dir, args.batches, args.repeats)
    else:
        table(args.pairs)


if __name__ == "__main__":
    main()
