"""`ttt-pipe corrupt`: a dataset's test split -> corrupted Parquet shards."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from jobs.commands import DATASET_HELP, check_dataset
from jobs.console import cli_errors, console, progress
from pipeline.corruptions import list_corruptions
from pipeline.datasets import CACHE_ROOT
from pipeline.shard_maker import DEFAULT_SHARD_SIZE, make_shards

__all__ = ["command"]



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
        help="Comma-separated corruptions, or 'all'. Choose from: "
             f"{', '.join(list_corruptions(include_identity=True))}.")] = "all",
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
) -> None:
    """Corrupt a dataset's test split and write Parquet shards.

    One file per (corruption, severity, chunk): <corruption>-s<severity>-<index>.parquet.
    Everything is checked before the first file is written; on failure, files already
    written by this command are removed.
    """
    start = time.perf_counter()
    with progress() as bar:
        task = bar.add_task("corrupt", total=None)

        def advance(done: int, total: int, uri: str) -> None:
            bar.update(task, completed=done, total=total)

        summary = make_shards(dataset, out, corruptions, severities,
                              data_dir=data_dir, identity=identity, shard_size=shard_size,
                              limit=limit, seed=seed, download=download, progress=advance)
    seconds = time.perf_counter() - start
    console.print(
        f"wrote {len(summary.shards)} shards to {summary.out}: {summary.rows:,} rows = "
        f"{summary.samples:,} {summary.dataset} test samples x {len(summary.pairs)} "
        f"(corruption, severity), {summary.bytes / 1e6:,.1f} MB in {seconds:.1f} s",
        highlight=False, soft_wrap=True)
