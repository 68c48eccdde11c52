"""`ttt-pipe train`: joint training of a zoo model and a method's auxiliary part on Ray (or of the
model alone, `--method source`, for the methods that need no joint training)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from jobs.commands import DATASET_HELP, check_dataset, command_argv
from jobs.console import cli_errors, console, err_console, progress


class Method(str, Enum):
    ttt = "ttt"
    it3 = "it3"
    source = "source"


class Scope(str, Enum):
    all = "all"
    aux = "aux"




@cli_errors
def command(
    method: Method = typer.Option(..., help="Test-time method whose auxiliary part is trained jointly "
                                            "(ttt, it3), or source: the model alone, plain supervised "
                                            "training (then ttt-pipe adapt --method norm|tent|eata|...)."),
    dataset: str = typer.Option(None, help=f"{DATASET_HELP} Its train split is used. Required "
                                "unless --init gives it (a folder checkpoint: pass its folder:PATH).",
                                callback=check_dataset),
    out: str = typer.Option(..., help="Checkpoint directory to write (local path or s3://...; "
                                      "on a cluster, storage every node can read)."),
    data_dir: Path = typer.Option(None, help="Folder with the dataset's files (default: search; see 'ttt-pipe corrupt --help')."),
    model: str = typer.Option(None, help="Zoo model (seed_cnn, seed_rescnn, seed_cnn_bn, resnet26, wrn28_10, "
                                         "resnet18, resnet50; default: seed_cnn for ttt, seed_rescnn for "
                                         "it3, seed_cnn_bn for source) or your own package.module:factory "
                                         "(installed on every node)."),
    model_kwargs: str = typer.Option(None, help="""JSON object of extra model kwargs, e.g. '{"norm": "batch"}' """
                                                "(your factory gets exactly these)."),
    normalize: str = typer.Option(None, help="Normalisation inside the model: none, dataset, imagenet, MEAN,STD "
                                             "or \\[m1,m2,m3],\\[s1,s2,s3] (default: the model's; your own: none)."),
    trust_model: str = typer.Option(None, help="Comma list of modules a model import path may come from "
                                               "(also $TTT_PIPE_TRUSTED_MODULES); --model's own is trusted."),
    layer: str = typer.Option(None, help="Layer the auxiliary part attaches to (default: the method's)."),
    init: str = typer.Option(None, help="Start from this checkpoint's model (ttt-pipe import-model's "
                                        "source checkpoint, or any checkpoint's model part); it also "
                                        "fixes the dataset, normalisation and model kwargs."),
    train: Scope = typer.Option(Scope.all, help="What trains: all (model and auxiliary part) or aux "
                                                "(the --init model frozen, BN statistics too; only "
                                                "the head/embedder trains)."),
    image_size: int = typer.Option(None, help="Image side for folder:/imagenet data (default 224)."),
    epochs: int = typer.Option(None, help="Training epochs (default: the method's: ttt 1, it3 2)."),
    batch_size: int = typer.Option(None, help="Training batch size per worker (default: ttt 64, "
                                              "it3 256); with --workers N the global batch is N times it."),
    lr: float = typer.Option(None, help="Learning rate (default: adam the method's, ttt 1e-2, it3 1e-3; sgd 0.1)."),
    optimizer: str = typer.Option(None, help="adam (the seeds' recipe, default) or sgd (momentum, weight "
                                             "decay, cosine schedule by default)."),
    weight_decay: float = typer.Option(None, help="Weight decay (default: adam 0, sgd 5e-4; adam with "
                                                  "weight decay is AdamW)."),
    momentum: float = typer.Option(None, help="SGD momentum (default 0.9; sgd only)."),
    schedule: str = typer.Option(None, help="Learning-rate schedule: none or cosine (per batch, to 0 at "
                                            "the end; default: adam none, sgd cosine)."),
    augment: str = typer.Option(None, help="none, cifar (crop with padding 4 + flip), imagenet "
                                           "(random-resized crop + flip) or auto (default: none on "
                                           "MNIST-like data, cifar on 32x32 RGB, imagenet on other RGB)."),
    precision: str = typer.Option(None, help="fp32 (default), bf16 (autocast; CPU or GPU) or fp16 "
                                             "(autocast + GradScaler; CUDA only)."),
    val_fraction: float = typer.Option(None, help="Share of the train split held out for per-epoch "
                                                  "validation accuracy (seeded; default: 0 on MNIST-like "
                                                  "data, 0.1 on RGB; 0 turns it off)."),
    aux_weight: float = typer.Option(None, help="Joint loss = CE + aux_weight * aux loss "
                                                "(default: ttt 0.35, it3 1.0)."),
    limit: int = typer.Option(None, help="Train on the first N samples only."),
    preset: str = typer.Option(None, help="A named setting instead of the method's defaults, kept "
                                          "in the checkpoint for adapt: 'seeds' (ttt, it3: the "
                                          "seeds' protocol, torch-ttt's tutorial numbers), "
                                          "'tutorial' (it3). Other options override it."),
    seed: int = typer.Option(0, help="Seed of the initial weights and the shuffling."),
    gpus: float = typer.Option(None, help="GPUs for the trainer (default: 1 if the cluster has "
                                          "any, else CPU; 0 forces the CPU)."),
    cpus: float = typer.Option(1.0, help="CPUs the trainer (with --workers: each worker) reserves "
                                         "on the CPU; torch runs floor(cpus) threads (at least 1; "
                                         "with --workers N > 1 fractions like 0.5 are allowed)."),
    workers: int = typer.Option(1, help="Data-parallel workers (Ray Train TorchTrainer, DDP; "
                                        "--gpus and --cpus per worker). 1 (default): one trainer "
                                        "actor. The learning rate is not rescaled."),
    address: str = typer.Option(None, envvar="RAY_ADDRESS",
                                help="Ray cluster: auto, host:port, ray://host:10001, or "
                                     "http://head:8265 to submit this command as a job "
                                     "(default: a local Ray for this command)."),
) -> None:
    """Train a model jointly with the method's auxiliary task (or alone: --method source) and
    write a checkpoint (with --init: from a checkpoint's model, --train aux for the auxiliary
    part alone)."""
    from jobs.cluster import is_job_address, submit_job
    from jobs.train import resolve_spec

    spec = resolve_spec(method.value, dataset, out, model=model, epochs=epochs,
                        batch_size=batch_size, lr=lr, aux_weight=aux_weight, layer=layer,
                        limit=limit, seed=seed, data_dir=None if data_dir is None else str(data_dir),
                        gpus=gpus, cpus=cpus, model_kwargs=model_kwargs, normalize=normalize,
                        trust_model=trust_model, optimizer=optimizer, weight_decay=weight_decay,
                        momentum=momentum, schedule=schedule, augment=augment, precision=precision,
                        val_fraction=val_fraction, image_size=image_size, init=init,
                        train=train.value, preset=preset, workers=workers)
    if is_job_address(address):
        argv = command_argv("train", method=method, dataset=dataset, out=out, data_dir=data_dir, model=model,
                     layer=layer, epochs=epochs, batch_size=batch_size, lr=lr,
                     aux_weight=aux_weight, limit=limit, seed=seed, gpus=gpus, cpus=cpus,
                     model_kwargs=model_kwargs, normalize=normalize, trust_model=trust_model,
                     optimizer=optimizer, weight_decay=weight_decay, momentum=momentum,
                     schedule=schedule, augment=augment, precision=precision,
                     val_fraction=val_fraction, image_size=image_size, init=init,
                     train=None if train is Scope.all else train,  # all: the default
                     preset=preset, workers=None if workers == 1 else workers)
        raise typer.Exit(code=submit_job(address, argv))

    manifest = train_with_progress(spec, address)
    summary(spec.out, manifest)


def train_with_progress(spec, address: str | None = None) -> dict:
    """`jobs.train.train` with a progress bar and one line per epoch; returns the manifest."""
    from jobs.train import train

    import time

    bar = progress()
    task = None
    clock = {"start": 0.0, "first_epoch": 0}

    def eta(epoch: int) -> str:
        """Time left after `epoch`, from this run's epochs so far (also when the bar is off)."""
        done = epoch - clock["first_epoch"]
        left = spec.epochs - epoch
        if done <= 0 or left <= 0:
            return ""
        seconds = (time.perf_counter() - clock["start"]) / done * left
        return f"  eta {int(seconds // 60)}m{int(seconds % 60):02d}s"

    def on_event(kind: str, info: dict) -> None:
        nonlocal task
        if kind == "setup":
            clock.update(start=time.perf_counter(), first_epoch=info["resumed_from_epoch"])
            r = info["recipe"]
            held = f" ({info['val_samples']} held out for validation)" if info["val_samples"] else ""
            err_console.print(
                f"training {spec.method} on {spec.dataset}{_init_note(spec)}: {info['samples']} samples{held}, "
                f"{spec.epochs} epoch(s) of {info['batches_per_epoch']} batches, {r['optimizer']} "
                f"lr {r['lr']:g}, schedule {r['schedule']}, augment {r['augment']}, "
                f"{r['precision']}, device {info['device']}", highlight=False, soft_wrap=True)
            resumed = info["resumed_from_epoch"]
            if resumed:
                err_console.print(f"resuming after epoch {resumed}/{spec.epochs} "
                                  f"(state in {spec.out}.train-state)", highlight=False, soft_wrap=True)
            task = bar.add_task("train", total=spec.epochs * info["batches_per_epoch"],
                                completed=resumed * info["batches_per_epoch"])
        elif kind == "progress":
            done = (info["epoch"] - 1) * info["batches_per_epoch"] + info["batches_done"]
            if info["epoch_metrics"]:
                done = info["epoch"] * info["batches_per_epoch"]
                m = info["epoch_metrics"]
                bar.console.print(
                    f"epoch {m['epoch']}/{spec.epochs}: loss {m['loss']:.4f}  "
                    f"accuracy {m['accuracy']:.4f}  aux loss {m['aux_loss']:.4f}"
                    + (f"  val accuracy {m['val_accuracy']:.4f}" if "val_accuracy" in m else "")
                    + (f"  {m['images_per_s']:.0f} images/s" if m.get("images_per_s") else "")
                    + eta(m["epoch"]),
                    highlight=False, soft_wrap=True)
            bar.update(task, completed=done)

    with bar:
        return train(spec, address=address, on_event=on_event)


def _init_note(spec) -> str:
    if spec.init is None:
        return ""
    what = "its auxiliary part only, model frozen" if spec.train_scope == "aux" else "model and auxiliary part"
    return f" from {spec.init['uri']} ({what})"


def summary(out: str, manifest: dict) -> None:
    t = manifest["training"]
    last = t["metrics"][-1] if t["metrics"] else {}
    console.print(
        f"checkpoint {out}: {manifest['method']['name']} + {manifest['model']['name']} on "
        f"{manifest['dataset']['name']}, {t['samples']} samples x {t['epochs']} epoch(s) in "
        f"{t['seconds']:.1f}s; final train loss {last.get('loss', float('nan')):.4f}, "
        f"accuracy {last.get('accuracy', float('nan')):.4f}; sha256 {manifest['weights_sha256'][:12]}",
        highlight=False, soft_wrap=True)
