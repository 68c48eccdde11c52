"""Sample images, clean vs corrupted, read from the shards a run was asked to process."""

from __future__ import annotations

import json
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
from pipeline.shards import to_pixels

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
    """The first `rows` rows of a shard: sample_id, label (None entries: unlabelled) and
    image (n, H, W, C) in pixel units; the shape and dtype come from the shard's schema."""
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        batch = next(pf.iter_batches(batch_size=rows, columns=["sample_id", "label", "image"]))
        meta = pf.schema_arrow.metadata or {}
    raw = meta.get(b"ttt_pipe.image_shape")
    if not raw:
        raise TTTPipeError(f"{uri} has no ttt_pipe.image_shape metadata")
    shape = tuple(json.loads(raw))
    flat = batch.column("image").flatten().to_numpy(zero_copy_only=False)
    images = to_pixels(flat.reshape(len(batch), *shape))
    return {"sample_id": batch.column("sample_id").to_numpy(zero_copy_only=False),
            "label": batch.column("label").to_pylist(),
            "image": images.transpose(0, 2, 3, 1)}


def _label(value) -> str:
    return "?" if value is None else str(int(value))


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
    height, width, channels = rows[0][1]["image"].shape[1:]
    gap = 3  # white pixels between images
    # one axes per row showing a strip of images: far faster than one axes per image
    fig, axes = plt.subplots(len(rows), 1, figsize=(1.1 * ncols + 1.6, 1.25 * len(rows) + 0.6),
                             squeeze=False, layout="constrained")
    for ax, (label, data) in zip(axes[:, 0], rows):
        where = {int(sid): j for j, sid in enumerate(data["sample_id"])}
        idx = [where[int(s)] for s in wanted if int(s) in where]
        if len(idx) < ncols:  # shards that do not share samples: show their first ones
            idx = list(range(min(ncols, len(data["sample_id"]))))
        strip = np.ones((height, ncols * (width + gap) - gap, channels), np.float32)
        for j, k in enumerate(idx):
            image = data["image"][k]
            if image.shape != (height, width, channels):  # another shape than the first row's
                continue
            strip[:, j * (width + gap): j * (width + gap) + width] = np.clip(image, 0, 1)
        if channels == 1:  # grayscale; RGB strips are shown as they are
            ax.imshow(strip[:, :, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(strip, interpolation="nearest")
        ax.set_xticks([j * (width + gap) + width / 2 for j in range(len(idx))])
        ax.set_xticklabels([f"#{int(data['sample_id'][k])}: {_label(data['label'][k])}"
                            for k in idx], fontsize=7)
        ax.tick_params(length=0, pad=2)
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
        for spine in ax.spines.values():
            spine.set_visible(False)
    unlabelled = any(v is None for _, r in rows for v in r["label"][:ncols])
    what = "#sample id: label" + ("; ? = no label" if unlabelled else "")
    fig.suptitle(f"Sample test images ({what}): clean vs corrupted" if has_clean
                 else f"Sample test images ({what}), corrupted only: no clean shard",
                 fontsize=12,
                 fontweight="bold")
    return SampleGrid(to_png(fig), notes)
