"""The CLI's commands, one module each, and what they share."""

from __future__ import annotations

from enum import Enum

import typer

from pipeline.datasets import dataset_forms, get_dataset, list_datasets
from pipeline.errors import TTTPipeError

__all__ = ["DATASET_HELP", "check_actors", "check_dataset", "command_argv"]

DATASET_HELP = (f"Dataset: {', '.join(dataset_forms())} (an ImageFolder tree with train/ and "
                "val/ or test/, one subfolder per class).")


def check_dataset(value: str | None) -> str | None:
    """Typer callback of ``--dataset``: the form, checked by get_dataset (a folder's class
    subfolders are listed; no image is read)."""
    if value is None:
        return None
    if value.lower() in list_datasets():
        value = value.lower()
    try:
        get_dataset(value)
    except TTTPipeError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


def check_actors(value: str | None) -> str | None:
    """Typer callback of ``--actors`` (adapt, run): N or MIN:MAX, checked by jobs.pool.parse_actors."""
    from jobs.pool import parse_actors

    try:
        parse_actors(value)
    except TTTPipeError as exc:
        raise typer.BadParameter(str(exc).split(": ", 1)[-1]) from None
    return value


def command_argv(command: str, **opts) -> list[str]:
    """`command --opt value ...` again (None options left out): the argv of a submitted job."""
    argv = [command]
    for key, value in opts.items():
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value.value if isinstance(value, Enum) else value)]
    return argv
