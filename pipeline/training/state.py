"""The per-epoch training state next to the output checkpoint: `<out>.train-state/state.pt`.

Written atomically after every finished epoch (a reader sees the previous epoch's file or the
whole new one), read back with ``weights_only=True``, removed once the checkpoint is written.
A sibling folder rather than one inside `<out>`: `<out>` appears only when the run completes.
"""

from __future__ import annotations

import io

import torch

from pipeline import storage
from pipeline.errors import TTTPipeError

__all__ = ["state_uri", "save_state", "load_state", "remove_state"]

STATE_DIR_SUFFIX = ".train-state"
STATE_NAME = "state.pt"


def state_uri(out: str) -> str:
    return storage.join(out.rstrip("/") + STATE_DIR_SUFFIX, STATE_NAME)


def save_state(out: str, state: dict) -> str:
    uri = state_uri(out)
    storage.makedirs(uri[: -len(STATE_NAME) - 1])
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.atomic_write_bytes(buf.getvalue(), uri)
    return uri


def load_state(out: str) -> dict | None:
    """The saved state, or None when there is none."""
    uri = state_uri(out)
    if not storage.exists(uri):
        return None
    try:
        return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file: say where it is and how to start over
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TTTPipeError(f"cannot read the training state {uri} ({first}); delete "
                           f"{uri[: -len(STATE_NAME) - 1]} to start the run over") from None


def remove_state(out: str) -> None:
    uri = state_uri(out)
    storage.remove(uri)
    folder = uri[: -len(STATE_NAME) - 1]
    fs, path = storage.resolve(folder)
    try:
        fs.delete_dir(path)
    except (FileNotFoundError, OSError):
        pass
