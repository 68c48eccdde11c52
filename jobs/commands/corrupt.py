"""`ttt-pipe corrupt`: a dataset's test split -> corrupted Parquet shards, as a Ray job."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from jobs.commands import DATASET_HELP, check_dataset, command_argv
from jobs.console import cli_errors, console, run_with_bar
from pipeline.corruptions import list_corruptions, list_validation_corruptions
from pipeline.corruptions.suites import suite_names
from pipeline.datasets import CACHE_ROOT
from pipeline.shard_maker import DEFAULT_SHARD_SIZE

__all__ = ["command", "print_summary"]


def print_summary(summary, seconds: float) -> None:
    console.print(
        f"wrote {len(summary.shards)} shards to {summary.out}: {summary.rows:,} rows = "
        f"{summary.samples:,} {summary.dataset} test samples x {len(summary.pairs)} "
        f"(corruption, severity), {summary.bytes / 1e6:,.1f} MB in {seconds:.1f} s",
        highlight=False, soft_wrap=True)


@cli_errors
def command(
    dataset: Annotated[str, typer.Option(
        help=f"{DATASET_HELP} Its test split is corrupted.", callback=check_dataset,
        show_default=False)],
    out: Annotated[str, typer.Option(
        help="Folder for the shards (local path or s3://, gs://, file:// URI); created if "
             "needed. It may hold shards of an identical earlier run (overwritten), no others.",
        show_default=False)],
    corruptions: Annotated[str, typer.Option(
        help="Comma-separated corruptions, or 'all' ('common' = the 15 for RGB data; "
             "'validation' = the 4 kept for tuning, never in 'all'). The suite follows the data: "
             f"grayscale -> mnist-c: {', '.join(list_corruptions(include_identity=True))} "
             f"(validation: {', '.join(list_validation_corruptions())}); RGB -> imagenet-c: "
             f"{', '.join(suite_names('imagenet-c'))}.")] = "all",
    severities: Annotated[str, typer.Option(
        help="Comma-separated severities 1-5 (or 'all'); each corruption is written at each.",
    )] = "1,2,3,4,5",
    identity: Annotated[bool, typer.Option(
        "--identity/--no-identity",
        help="Also write the clean baseline (corruption 'identity', severity 0) once.")] = True,
    data_dir: Annotated[Path | None, typer.Option(
        help="Folder with the dataset's files: mnist/fashion-mnist the four IDX files "
             "(train/t10k-images-idx3-ubyte[.gz], -labels-idx1-ubyte[.gz]), a <dataset>/ "
             "subfolder, or torchvision's MNIST/raw layout; cifar10/100 cifar-10-batches-bin/ "
             "or -py/ (cifar-100-binary/, cifar-100-python/); imagenet train/ and val/. "
             "Default: $TTT_PIPE_DATA, then /usr/share/datasets/<dataset> (IDX; apt-get "
             f"install dataset-fashion-mnist), then {CACHE_ROOT}.",
        show_default=False)] = None,
    download: Annotated[bool | None, typer.Option(
        "--download/--no-download",
        help="Download with torchvision into the cache when no files are found. "
             "Default: yes, unless TTT_PIPE_OFFLINE or CI is set.", show_default=False)] = None,
    shard_size: Annotated[int, typer.Option(
        min=1, help="Samples per shard file (the last shard of a set may be smaller).",
    )] = DEFAULT_SHARD_SIZE,
    limit: Annotated[int | None, typer.Option(
        min=1, help="Use only the first N test samples (default: all).",
        show_default=False)] = None,
    seed: Annotated[int, typer.Option(
        min=0, help="Seed of the random corruptions; same arguments, byte-identical shards.",
    )] = 0,
    image_size: Annotated[int | None, typer.Option(
        min=1, help="Image size of imagenet / folder:PATH data (default 224: Resize(256) + "
                    "CenterCrop(224) as ImageNet's).", show_default=False)] = None,
    cpus_per_task: Annotated[float, typer.Option(
        min=0.01, help="CPUs each Ray task (one shard file) reserves; 0.5 runs two per core.",
    )] = 1.0,
    address: Annotated[str | None, typer.Option(
        envvar="RAY_ADDRESS",
        help="Ray cluster: auto, host:port, ray://host:10001, or http://head:8265 to submit "
             "this command as a job (default: a local Ray for this command). Paths must be "
             "on storage every node reads.", show_default=False)] = None,
) -> None:
    """Corrupt a dataset's test split and write Parquet shards (a Ray task per file).

    One file per (corruption, severity, chunk): <corruption>-s<severity>-<index>.parquet.
    Everything is checked before the first file is written; on failure, files already
    written by this command are removed.
    """
    from jobs.cluster import is_job_address, submit_job
    from jobs.corrupt import run_corrupt
    from pipeline.shard_maker import plan_make

    form = dataset
    if is_job_address(address):
        argv = command_argv("corrupt", dataset=form, out=out, corruptions=corruptions,
                            severities=severities, data_dir=data_dir, download=None,
                            shard_size=shard_size, limit=limit, seed=seed,
                            image_size=image_size, cpus_per_task=cpus_per_task)
        argv += ["--identity" if identity else "--no-identity"]
        if download is not None:
            argv += ["--download" if download else "--no-download"]
        raise typer.Exit(code=submit_job(address, argv))
    start = time.perf_counter()
    plan = plan_make(form, out, corruptions, severities, data_dir=data_dir, identity=identity,
                     shard_size=shard_size, limit=limit, seed=seed, download=download,
                     image_size=image_size)
    result = run_with_bar("corrupt", len(plan.tasks), lambda advance: run_corrupt(
        plan, address=address, cpus_per_task=cpus_per_task, progress=advance))
    print_summary(result["summary"], time.perf_counter() - start)
