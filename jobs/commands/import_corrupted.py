"""`ttt-pipe import-corrupted`: the released CIFAR-10/100-C or ImageNet-C files -> shards (Ray job)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from jobs.commands import command_argv
from jobs.commands.corrupt import print_summary
from jobs.console import cli_errors, run_with_bar
from pipeline.shard_import import TARGET_SHARD_BYTES

__all__ = ["command"]


@cli_errors
def command(
    layout: Annotated[str, typer.Option(
        help="Layout of --src: 'cifar-c' (<corruption>.npy + labels.npy, CIFAR-10-C or "
             "CIFAR-100-C) or 'imagenet-c' (<corruption>/<severity>/<wnid>/*.JPEG).",
        show_default=False)],
    src: Annotated[Path, typer.Option(
        help="The extracted release folder (e.g. CIFAR-10-C/).", show_default=False)],
    dataset: Annotated[str, typer.Option(
        help="The clean dataset the release corrupts: cifar10, cifar100, imagenet or "
             "folder:PATH (its class list gives the labels).", show_default=False)],
    out: Annotated[str, typer.Option(
        help="Folder for the shards (local path or s3://, gs://, file:// URI); created if needed.",
        show_default=False)],
    corruptions: Annotated[str, typer.Option(
        help="Comma-separated corruptions, 'all' (what --src holds), 'common' (the 15) or "
             "'validation' (the 4).")] = "all",
    severities: Annotated[str, typer.Option(help="Comma-separated severities 1-5.")] = "1,2,3,4,5",
    limit: Annotated[int | None, typer.Option(
        min=1, help="A seeded random subset of N samples per (corruption, severity) "
                    "(the same samples in each).", show_default=False)] = None,
    shard_size: Annotated[int | None, typer.Option(
        min=1, help=f"Samples per shard file (default: about {TARGET_SHARD_BYTES // 10**6} MB of "
                    "pixels: 996 at 224x224, the whole unit at 32x32).", show_default=False)] = None,
    seed: Annotated[int, typer.Option(
        min=0, help="Seed of the row shuffle inside each shard set (recorded in the metadata) "
                    "and of --limit.")] = 0,
    image_size: Annotated[int | None, typer.Option(
        min=1, help="Image size of imagenet / folder:PATH data (default 224, the size "
                    "ImageNet-C was released at; images of another size are an error).",
        show_default=False)] = None,
    data_dir: Annotated[Path | None, typer.Option(
        help="Where the clean dataset is (ImageNet-C sample ids = indices in the clean val "
             "split when it is found).", show_default=False)] = None,
    cpus_per_task: Annotated[float, typer.Option(
        min=0.01, help="CPUs each Ray task (one shard file) reserves.")] = 1.0,
    address: Annotated[str | None, typer.Option(
        envvar="RAY_ADDRESS",
        help="Ray cluster: auto, host:port, ray://host:10001, or http://head:8265 to submit "
             "this command as a job (default: a local Ray).", show_default=False)] = None,
) -> None:
    """Import a released corrupted benchmark into shards: one (corruption, severity) per set.

    Rows are shuffled with --seed inside each set (the releases are sorted by class); sample
    ids are indices in the clean test split. Nothing is written if any input is wrong; on
    failure, files already written by this command are removed.
    """
    from jobs.cluster import is_job_address, submit_job
    from jobs.corrupt import run_import
    from pipeline.shard_import import plan_import_shards

    if is_job_address(address):
        argv = command_argv("import-corrupted", layout=layout, src=src, dataset=dataset, out=out,
                            corruptions=corruptions, severities=severities, limit=limit,
                            shard_size=shard_size, seed=seed, image_size=image_size,
                            data_dir=data_dir, cpus_per_task=cpus_per_task)
        raise typer.Exit(code=submit_job(address, argv))
    start = time.perf_counter()
    plan = plan_import_shards(layout, src, dataset, out, corruptions, severities, limit=limit,
                              shard_size=shard_size, seed=seed, data_dir=data_dir,
                              image_size=image_size)
    result = run_with_bar("import", len(plan.tasks), lambda advance: run_import(
        plan, address=address, cpus_per_task=cpus_per_task, progress=advance))
    print_summary(result["summary"], time.perf_counter() - start)
