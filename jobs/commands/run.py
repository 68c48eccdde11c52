"""`ttt-pipe run`: train -> corrupt -> adapt -> report in one command (the quick start).

Layout under `--out`:  checkpoints/<method>/  shards/  results/<method>/  report/
`--method` is a comma list (`both` = ttt,it3): ttt and it3 train their joint checkpoints
(checkpoints/ttt/, checkpoints/it3/); every method without joint training (source, norm, tent,
eata, ...) adapts ONE source checkpoint trained once (checkpoints/source/, plain supervised
training). Each method's results go to results/<method>/; the report covers them all.
Rerunning the same command resumes: a checkpoint trained with the same settings is reused,
the shards are rewritten byte-identically, and adaptation skips finished shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from jobs.commands import DATASET_HELP, check_actors, check_dataset
from jobs.console import cli_errors, err_console
from pipeline.errors import TTTPipeError

__all__ = ["command", "DEMO_CORRUPTIONS", "DEMO_RGB_CORRUPTIONS", "default_model",
           "parse_run_methods", "checkpoint_method", "reusable_checkpoint"]


# A spread of each suite (noise, blur, weather, digital) that adapts in a few minutes on 2 cores.
DEMO_CORRUPTIONS = "gaussian_noise,shot_noise,impulse_noise,glass_blur,motion_blur,fog,zigzag"
DEMO_RGB_CORRUPTIONS = ("gaussian_noise,shot_noise,impulse_noise,defocus_blur,motion_blur,"
                        "contrast,pixelate,jpeg_compression")
DEMO = {"mnist-c": DEMO_CORRUPTIONS, "imagenet-c": DEMO_RGB_CORRUPTIONS}
# Images up to this side get the method's seed net (fast on a laptop, any C x H x W through
# in_channels/image_size); larger ones (imagenet, folder:PATH at 224) a torchvision ResNet-18.
_SEED_NET_MAX_SIDE = 64


def default_model(method: str, spec) -> str:
    """`run`'s model when --model is not given: the seed net of `method` (seed_cnn for ttt,
    seed_rescnn for it3, seed_cnn_bn for the shared source checkpoint: it has BatchNorm for
    norm/tent/...) for images up to 64 px (MNIST, Fashion-MNIST, CIFAR-10/100), else resnet18."""
    from jobs.train import DEFAULT_MODELS

    if max(spec.image_shape[1:]) <= _SEED_NET_MAX_SIDE:
        return DEFAULT_MODELS[method]
    return "resnet18"


_BOTH = ("ttt", "it3")  # `--method both`


def _preset_for(method: str, preset: str | None, trained: list[str]) -> str | None:
    """`--preset` goes to the checkpoints whose method has it (the seeds' protocol is TTT's and
    IT3's; the shared source checkpoint has none); a preset no method of the run has is an error."""
    import engines

    if preset is None:
        return None
    have = [m for m in trained if preset in engines.get_engine(m).config_cls.presets]
    if not have:
        raise TTTPipeError(f"--preset {preset!r}: no method of this run has it "
                           f"({', '.join(trained)}); the seeds preset is ttt's and it3's")
    return preset if method in have else None


def parse_run_methods(text: str) -> list[str]:
    """`--method` -> the methods in the order given, each once: a comma list of registered
    methods, `both` standing for ttt,it3. One-line error naming the valid ones."""
    from pipeline.methods import checkpoint_agnostic_methods
    import engines

    names: list[str] = []
    for part in str(text).split(","):
        name = part.strip().lower()
        for m in (_BOTH if name == "both" else (name,)):
            if m not in engines.list_engines():
                raise TTTPipeError(f"unknown method {m!r} in --method {text!r}; choose from: "
                                   f"{', '.join(engines.list_engines())} or both (ttt,it3)")
            if m not in names:
                names.append(m)
    if not names:
        raise TTTPipeError("--method is empty; name one or more methods, e.g. ttt or source,tent,ttt "
                           f"(any of {', '.join(sorted(checkpoint_agnostic_methods() + list(_BOTH)))})")
    return names


def checkpoint_method(method: str) -> str:
    """The checkpoint `method` adapts under `run`: its own joint one, else the shared source one."""
    import engines
    from pipeline.checkpoint import SOURCE_METHOD

    return method if engines.get_engine(method).needs_joint_training else SOURCE_METHOD


# Training settings that must match for a checkpoint under --out to be reused.
_TRAINING_KEYS = ("epochs", "batch_size", "lr", "seed", "limit")


def reusable_checkpoint(uri: str, spec) -> bool:
    """True if `uri` holds a valid checkpoint trained exactly as `spec` says; False if there is
    none; TTTPipeError if there is a different one (we never overwrite a user's checkpoint)."""
    from pipeline import storage
    from pipeline.checkpoint import checkpoint_image_shape, load_checkpoint
    from pipeline.datasets import get_dataset
    from pipeline.model_spec import resolve_model_spec

    if not storage.exists(storage.join(uri, "manifest.json")):
        return False
    ckpt = load_checkpoint(uri, expect_method=spec.method)  # sha-verified
    manifest = ckpt.manifest
    training = manifest["training"]
    # the identity (folder:PATH -> folder:<dirname>-<hash>), as train.py writes it
    ds = get_dataset(spec.dataset, spec.image_size)
    model_entry = resolve_model_spec(spec.model, ds, normalize=spec.normalize,
                                     model_kwargs=spec.model_kwargs).to_manifest()
    wanted = {"method": spec.method, "dataset": ds.name, "model": spec.model,
              "image_shape": tuple(ds.image_shape), "model_entry": model_entry,
              **{k: getattr(spec, k) for k in _TRAINING_KEYS}}
    found = {"method": manifest["method"]["name"], "dataset": manifest["dataset"]["name"],
             "model": manifest["model"]["name"], "image_shape": checkpoint_image_shape(ckpt),
             "model_entry": manifest["model"], **{k: training.get(k) for k in _TRAINING_KEYS}}
    config_diff = _config_diff(spec.method, manifest["method"]["config"], spec.config)
    if found != wanted or config_diff:
        diff = ", ".join(f"{k}: {found[k]!r} != {wanted[k]!r}" for k in wanted if found[k] != wanted[k])
        raise TTTPipeError(f"{uri} holds a checkpoint trained differently "
                           f"({diff or 'method config: ' + ', '.join(config_diff)});"
                           " pass another --out or delete it")
    return True


def _config_diff(method: str, stored: dict, wanted: dict) -> list[str]:
    """The config fields that differ, both read through the engine's config class (a field a
    newer version added is at its default in an older checkpoint, not a difference)."""
    import engines

    def full(data: dict) -> dict:
        try:
            return engines.config_from_dict(method, data).to_dict()
        except ValueError:  # e.g. a field this version does not know: compare as stored
            return data
    a, b = full(stored), full(wanted)
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


@cli_errors
def command(
    dataset: Annotated[str, typer.Option(
        help=f"{DATASET_HELP} Train split for training, test split for the shards.",
        callback=check_dataset)] = "fashion-mnist",
    method: Annotated[str, typer.Option(
        help="Method(s) to adapt with, a comma list: ttt, it3 (each trains its joint checkpoint), "
             "source, norm, tent, eata, sar, memo, cotta, lame (they share one source checkpoint, "
             "trained once); 'both' = ttt,it3. E.g. source,norm,tent,ttt.")] = "ttt",
    out: Annotated[str, typer.Option(
        help="Folder for everything: checkpoints/, shards/, results/, report/.")] = "runs/demo",
    data_dir: Annotated[Path | None, typer.Option(
        help="Folder with the dataset's files (default: search; see 'ttt-pipe corrupt --help').",
        show_default=False)] = None,
    model: Annotated[str | None, typer.Option(
        help="Zoo model or package.module:factory, for every method of the run (default: the "
             "method's seed net, seed_cnn for ttt, seed_rescnn for it3 and seed_cnn_bn for the "
             "source checkpoint of the other methods, for images up to 64 px: mnist, "
             "fashion-mnist, cifar10, cifar100; resnet18 for larger ones). E.g. resnet26 for "
             "the TTT paper's CIFAR network.",
        show_default=False)] = None,
    model_kwargs: Annotated[str | None, typer.Option(
        help="""JSON object of extra model kwargs, e.g. '{"norm": "batch"}' (as 'ttt-pipe train').""",
        show_default=False)] = None,
    normalize: Annotated[str | None, typer.Option(
        help="Normalisation inside the model: none, dataset, imagenet, MEAN,STD or "
             "\\[m1,m2,m3],\\[s1,s2,s3] (default: the model's; your own: none).",
        show_default=False)] = None,
    trust_model: Annotated[str | None, typer.Option(
        help="Comma list of modules a model import path may come from (also "
             "$TTT_PIPE_TRUSTED_MODULES); --model's own is trusted.", show_default=False)] = None,
    image_size: Annotated[int | None, typer.Option(
        min=1, help="Image side for folder:/imagenet data (default 224); train, shards and "
                    "adaptation all use it.", show_default=False)] = None,
    corruptions: Annotated[str | None, typer.Option(
        help="Comma-separated corruptions, or 'all' (RGB: also 'common', 'validation'). "
             f"Default: grayscale {DEMO_CORRUPTIONS}; RGB {DEMO_RGB_CORRUPTIONS}.",
        show_default=False)] = None,
    severities: Annotated[str, typer.Option(help="Comma-separated severities 1-5.")] = "5",
    limit: Annotated[int | None, typer.Option(
        min=1, help="Test samples per corruption (10000 = the whole test split).")] = 2000,
    train_limit: Annotated[int | None, typer.Option(
        min=1, help="Train on the first N samples only (default: the whole train split).",
        show_default=False)] = None,
    epochs: Annotated[int | None, typer.Option(
        min=1, help="Training epochs (default: the method's).", show_default=False)] = None,
    steps: Annotated[int | None, typer.Option(
        min=0, help="Adaptation steps (default: the method's).", show_default=False)] = None,
    actors: Annotated[str | None, typer.Option(
        callback=check_actors, help="Adaptation actors: N, or MIN:MAX for a pool that grows as nodes "
        "join (as 'ttt-pipe adapt') [default: as many as fit].", show_default=False)] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed for training and corruptions.")] = 0,
    preset: Annotated[str | None, typer.Option(
        help="Train (and so adapt) with a named setting instead of the defaults: 'seeds' = the "
             "seeds' protocol (torch-ttt's tutorial numbers).", show_default=False)] = None,
    address: Annotated[str | None, typer.Option(
        help="Ray cluster to attach to (auto, ray://host:10001); default: a local Ray. Paths "
        "must then be on storage every node can read.", show_default=False)] = None,
) -> None:
    """Train, corrupt, adapt and report in one go: the quick start on a laptop or a cluster."""
    from jobs.adapt import AdaptRequest
    from jobs.cluster import connect, is_job_address
    from jobs.commands.adapt import adapt_with_progress
    from jobs.commands.report import print_summary
    from jobs.commands.train import summary as train_summary
    from jobs.commands.train import train_with_progress
    from jobs.train import resolve_spec
    from jobs.corrupt import run_corrupt
    from pipeline import storage
    from pipeline.corruptions import parse_severities
    from pipeline.corruptions.suites import parse_corruptions, suite_for
    from pipeline.datasets import get_dataset, iter_split
    from pipeline.report import build_report
    from pipeline.shard_maker import plan_make

    if is_job_address(address):
        raise TTTPipeError("'ttt-pipe run' attaches to a cluster (auto, ray://...); to submit to "
                           f"{address}, use: ray job submit --address {address} -- ttt-pipe run ...")
    methods = parse_run_methods(method)
    trained = list(dict.fromkeys(checkpoint_method(m) for m in methods))  # checkpoints to train
    data = None if data_dir is None else str(data_dir)
    # Check every argument before the first (slow) stage starts.
    ds = get_dataset(dataset, image_size)
    suite = suite_for(ds.image_shape)
    corruptions = corruptions or DEMO[suite]
    parse_corruptions(corruptions, suite)
    parse_severities(severities)
    specs = {m: resolve_spec(m, dataset, storage.join(out, "checkpoints", m),
                             model=model or default_model(m, ds), epochs=epochs,
                             limit=train_limit, seed=seed, data_dir=data, model_kwargs=model_kwargs,
                             normalize=normalize, trust_model=trust_model, image_size=image_size,
                             preset=_preset_for(m, preset, trained))
             for m in trained}
    for split in ("train", "test"):  # unreadable files fail here, before anything is written
        next(iter_split(dataset, split, data, batch=1, rows=slice(0, 1), image_size=image_size), None)
    shards = storage.join(out, "shards")
    with connect(address):  # one Ray for every stage
        for m, spec in specs.items():
            users = [x for x in methods if checkpoint_method(x) == m and x != m]
            what = f"{m} (for {', '.join(users)})" if users else m
            if reusable_checkpoint(spec.out, spec):
                err_console.print(f"[1/4] train {what}: reusing {spec.out}", highlight=False)
            else:
                err_console.print(f"[1/4] train {what}", highlight=False)
                train_summary(spec.out, train_with_progress(spec, address))
        err_console.print(f"[2/4] corrupt: {corruptions} at severities {severities}",
                          highlight=False, soft_wrap=True)
        plan = plan_make(dataset, shards, corruptions, severities, data_dir=data, limit=limit,
                         seed=seed, image_size=image_size)
        made = run_corrupt(plan, address=address)["summary"]  # Ray tasks on this Ray
        err_console.print(f"      {len(made.shards)} shards, {made.rows:,} rows in {shards}",
                          highlight=False)
        results = []
        for m in methods:
            err_console.print(f"[3/4] adapt {m}", highlight=False)
            result = storage.join(out, "results", m)
            adapt_with_progress(AdaptRequest(checkpoint=specs[checkpoint_method(m)].out,
                                             shards=shards, out=result,
                                             steps=steps, actors=actors, seed=seed,
                                             address=address, method=m,
                                             trust_model=",".join(specs[checkpoint_method(m)].trusted) or None,
                                             data_dir=data))  # eata's Fisher: the train split
            results.append(result)
    err_console.print("[4/4] report", highlight=False)
    print_summary(build_report(results, out=storage.join(out, "report")))
