"""The CLI's commands, one module each, and what they share."""

from __future__ import annotations

from enum import Enum

from pipeline.datasets import list_datasets

__all__ = ["DatasetName", "command_argv"]

DatasetName = Enum("DatasetName", {name: name for name in list_datasets()}, type=str)
DatasetName.__doc__ = "Datasets ttt-pipe can read (pipeline.datasets.DATASETS)."


def command_argv(command: str, **opts) -> list[str]:
    """`command --opt value ...` again (None options left out): the argv of a submitted job."""
    argv = [command]
    for key, value in opts.items():
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value.value if isinstance(value, Enum) else value)]
    return argv
