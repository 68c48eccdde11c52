"""Sample images, clean vs corrupted, read from the shards a run was asked to process."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import TTTPipeError
from pipeline.report.plots import plt, to_png
from pipeline.report.table import CLEAN
from pipeline import storage
from pipeline.results import shard_name

__all__ = ["SampleGrid", "sample_grid"]

log = logging.getLogger(__name__)

_PEEK_ROWS = 256  # rows read from the start of a shard; enough to find the chosen samples


@dataclass(frozen=True)
class SampleGrid:
    png: bytes | None  # None when no shard could be read
    notes: list[str]  # what the figure leaves out, and why (unreachable shards, no clean row)


def _parse(name: str) -> tuple[str, int, int] | None:
    """`gaussian_noise-s5-00000` -> ('gaussian_noise', 5, 0); None if it is not a shard name."""
    head, _, index = name.rpartition("-")
    corruption, _, sev = head.rpartition("-s")
    if not corruption or not sev.isdigit() or not index.isdigit():
        return None
    return corruption, int(sev), int(index)


def _peek(uri: str, rows: int = _PEEK_ROWS) -> dict[str, np.ndarray]:
    """The first `rows` rows of a shard: sample_id, label, image (n, 28, 28)."""
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        batch = next(pf.iter_batches(batch_size=rows, columns=["sample_id", "label", "image"]))
        meta = pf.schema_arrow.metadata or {}
    shape = (28, 28)
    raw = meta.get(b"ttt_pipe.image_shape")
    if raw:
        import json

        shape = tuple(json.loads(raw))[-2:]
    image = batch.column("image")
    flat = image.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return {"sample_id": batch.column("sample_id").to_numpy(zero_copy_only=False),
            "label": batch.column("label").to_numpy(zero_copy_only=False),
            "image": flat.reshape(len(batch), *shape)}


def _candidates(uris: list[str]) -> list[tuple[str, list[tuple[int, str]]]]:
    """Rows of the grid, each with its shards in order of preference: clean first (lowest
    index), then each corruption (highest severity, lowest index first)."""
    by_corruption: dict[str, list[tuple[int, int, str]]] = {}
    for uri in uris:
        parsed = _parse(shard_name(uri))
        if parsed is not None:
            corruption, sev, index = parsed
            by_corruption.setdefault(corruption, []).append((-sev, index, uri))
    order = sorted(by_corruption, key=lambda c: (c != CLEAN, c))
    return [(c, [(-neg, u) for neg, _, u in sorted(by_corruption[c])]) for c in order]


def sample_grid(shard_uris: list[str], per_row: int = 8) -> SampleGrid:
    """Rows: clean (when an identity shard is readable), then each corruption at its highest
    readable severity; columns: the same test samples where the shards share them."""
    if not shard_uris:
        return SampleGrid(None, ["no sample images: run.json lists no shards"])
    notes: list[str] = []
    rows: list[tuple[str, dict[str, np.ndarray]]] = []
    for corruption, candidates in _candidates(shard_uris):
        for sev, uri in candidates:
            try:
                data = _peek(uri)
            except (OSError, pa.ArrowInvalid, StopIteration, KeyError, TTTPipeError) as exc:
                first = " ".join(str(exc).split()) or type(exc).__name__
                notes.append(f"shard {uri} is not reachable for the sample images ({first})")
                log.info("sample grid: cannot read %s: %s", uri, first)
                continue
            rows.append(("clean" if corruption == CLEAN else f"{corruption}\nseverity {sev}", data))
            break
        else:
            notes.append(f"no sample images of {corruption}: none of its shards could be read")
    has_clean = bool(rows) and rows[0][0] == "clean"
    if not has_clean:
        notes.insert(0, "no readable clean (identity) shard in this run: sample images show corrupted inputs only")
    if not rows:
        return SampleGrid(None, notes + ["no sample images: none of the run's shards could be read"])
    wanted = rows[0][1]["sample_id"][:per_row]
    ncols = min(per_row, max(len(r["sample_id"]) for _, r in rows))
    height, width = rows[0][1]["image"].shape[1:]
    gap = 3  # white pixels between images
    # one axes per row showing a strip of images: far faster than one axes per image
    fig, axes = plt.subplots(len(rows), 1, figsize=(1.1 * ncols + 1.6, 1.25 * len(rows) + 0.6),
                             squeeze=False, layout="constrained")
    for ax, (label, data) in zip(axes[:, 0], rows):
        where = {int(sid): j for j, sid in enumerate(data["sample_id"])}
        idx = [where[int(s)] for s in wanted if int(s) in where]
        if len(idx) < ncols:  # shards that do not share samples: show their first ones
            idx = list(range(min(ncols, len(data["sample_id"]))))
        strip = np.ones((height, ncols * (width + gap) - gap), np.float32)
        for j, k in enumerate(idx):
            strip[:, j * (width + gap): j * (width + gap) + width] = np.clip(data["image"][k], 0, 1)
        ax.imshow(strip, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([j * (width + gap) + width / 2 for j in range(len(idx))])
        ax.set_xticklabels([f"#{int(data['sample_id'][k])}: {int(data['label'][k])}" for k in idx],
                           fontsize=7)
        ax.tick_params(length=0, pad=2)
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
        for spine in ax.spines.values():
            spine.set_visible(False)
    fig.suptitle("Sample test images (#sample id: label): clean vs corrupted" if has_clean
                 else "Sample test images (#sample id: label), corrupted only: no clean shard",
                 fontsize=12,
                 fontweight="bold")
    return SampleGrid(to_png(fig), notes)
