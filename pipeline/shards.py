"""Shards: Parquet files of corrupted test images, one (corruption, severity) per file.

Schema (version 1, see docs/contracts.md): ``sample_id int64`` (index in the source split),
``label int16``, ``image fixed_size_list<float32>[784]`` (pixel units, row-major 1x28x28;
float32 keeps unclipped noise exactly), ``corruption string``, ``severity int8`` (0 for
``identity``), ``shard string`` (the file's stem). The Parquet key-value metadata holds
``ttt_pipe.<key>`` = JSON for ``schema_version``, ``image_shape``, ``dataset``, ``mean``,
``std``, ``seed``, ``corruption``, ``severity`` -- and no timestamp, so the same input gives
byte-identical files. Files are named ``<corruption>-s<severity>-<index:05d>.parquet`` and
written atomically through :mod:`pipeline.storage` (local paths and ``s3://``/``gs://`` alike).

Making a whole set of shards from a dataset is :func:`pipeline.shard_maker.make_shards`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import TTTPipeError

__all__ = ["SCHEMA", "SCHEMA_VERSION", "IMAGE_SHAPE", "META_PREFIX", "METADATA_KEYS",
           "SUFFIX", "Shard", "shard_name", "shard_table", "shard_metadata", "write_shard",
           "read_shard", "read_shard_table", "list_shards", "validate_table"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
IMAGE_SHAPE = (1, 28, 28)
_IMAGE_SIZE = int(np.prod(IMAGE_SHAPE))
SUFFIX = ".parquet"
META_PREFIX = "ttt_pipe."
METADATA_KEYS = ("schema_version", "image_shape", "dataset", "mean", "std", "seed",
                 "corruption", "severity")
SCHEMA = pa.schema([
    ("sample_id", pa.int64()),
    ("label", pa.int16()),
    ("image", pa.list_(pa.float32(), _IMAGE_SIZE)),
    ("corruption", pa.string()),
    ("severity", pa.int8()),
    ("shard", pa.string()),
])
# Pixel encoding, chosen from the pixels themselves (so still deterministic): images with few
# distinct values (clean, brightness, ...) are ~3x smaller dictionary-encoded; continuous ones
# (noise, blur) ~20% smaller as byte-stream-split floats (zstd then sees the exponents).
_DICTIONARY_MAX_VALUES = 1 << 16
_CONTINUOUS_OPTIONS = {"use_byte_stream_split": ["image.list.element"],
                       "use_dictionary": ["corruption", "shard"]}


@dataclass(frozen=True)
class Shard:
    """One shard in memory: arrays ready for a model (images in pixel units)."""

    name: str
    corruption: str
    severity: int
    sample_ids: np.ndarray  # (N,) int64
    labels: np.ndarray  # (N,) int64
    images: np.ndarray  # (N, 1, 28, 28) float32
    metadata: dict = field(default_factory=dict)  # decoded ttt_pipe.* keys, prefix dropped

    def __len__(self) -> int:
        return len(self.sample_ids)


def shard_name(corruption: str, severity: int, index: int) -> str:
    """``gaussian_noise-s5-00000``: the file stem (and ``shard`` column) of a shard."""
    return f"{corruption}-s{int(severity)}-{int(index):05d}"


def shard_metadata(*, dataset: str, mean: float, std: float, seed: int, corruption: str,
                   severity: int) -> dict[str, str]:
    """The ``ttt_pipe.*`` key-value metadata of a shard (values JSON-encoded)."""
    values = {"schema_version": SCHEMA_VERSION, "image_shape": list(IMAGE_SHAPE),
              "dataset": str(dataset), "mean": float(mean), "std": float(std),
              "seed": int(seed), "corruption": str(corruption), "severity": int(severity)}
    return {META_PREFIX + k: json.dumps(values[k]) for k in METADATA_KEYS}


def shard_table(sample_ids: np.ndarray, labels: np.ndarray, images: np.ndarray, *, name: str,
                corruption: str, severity: int, metadata: dict[str, str] | None = None,
                ) -> pa.Table:
    """Arrays -> a table with :data:`SCHEMA` (plus ``metadata`` if given)."""
    sample_ids = np.asarray(sample_ids, dtype=np.int64)
    labels = np.asarray(labels)
    images = np.asarray(images)
    n = len(sample_ids)
    if labels.shape != (n,) or images.shape[1:] != IMAGE_SHAPE or len(images) != n:
        raise TTTPipeError(f"shard {name}: expected {n} labels and images of shape "
                           f"(N, {', '.join(map(str, IMAGE_SHAPE))}), got {labels.shape} and "
                           f"{images.shape}")
    flat = np.ascontiguousarray(images, dtype=np.float32).reshape(-1)
    columns = [
        pa.array(sample_ids, pa.int64()),
        pa.array(labels.astype(np.int16), pa.int16()),
        pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), _IMAGE_SIZE),
        pa.array([corruption] * n, pa.string()),
        pa.array(np.full(n, severity, dtype=np.int8), pa.int8()),
        pa.array([name] * n, pa.string()),
    ]
    schema = SCHEMA.with_metadata(metadata) if metadata else SCHEMA
    return pa.Table.from_arrays(columns, schema=schema)


def write_shard(uri: str, sample_ids: np.ndarray, labels: np.ndarray, images: np.ndarray, *,
                corruption: str, severity: int, dataset: str, mean: float, std: float,
                seed: int) -> str:
    """Validate and atomically write one shard to ``uri`` (``.../<name>.parquet``)."""
    name = storage.basename(uri).removesuffix(SUFFIX)
    metadata = shard_metadata(dataset=dataset, mean=mean, std=std, seed=seed,
                              corruption=corruption, severity=severity)
    table = shard_table(sample_ids, labels, images, name=name, corruption=corruption,
                        severity=severity, metadata=metadata)
    validate_table(table, uri)
    few_values = len(np.unique(images)) <= _DICTIONARY_MAX_VALUES
    storage.atomic_write_table(table, uri, **({} if few_values else _CONTINUOUS_OPTIONS))
    log.debug("wrote shard %s (%d rows)", uri, table.num_rows)
    return uri


def read_shard_table(uri: str) -> pa.Table:
    """Read and validate one shard as an Arrow table (metadata included)."""
    fs, path = storage.resolve(uri)
    try:
        table = pq.read_table(path, filesystem=fs)
    except FileNotFoundError:
        raise TTTPipeError(f"no such shard: '{uri}'; list them with ls or rerun "
                           "ttt-pipe corrupt") from None
    except (pa.ArrowException, OSError) as exc:
        raise TTTPipeError(f"cannot read shard '{uri}': not a valid Parquet file "
                           f"({_one_line(exc)}); regenerate it with ttt-pipe corrupt") from None
    validate_table(table, uri)
    return table


def read_shard(uri: str) -> Shard:
    """Read, validate and convert one shard to numpy arrays."""
    table = read_shard_table(uri)
    meta = _decode_metadata(table, uri)
    images = table.column("image").combine_chunks().flatten().to_numpy()
    return Shard(
        name=table.column("shard")[0].as_py(),
        corruption=meta["corruption"],
        severity=int(meta["severity"]),
        sample_ids=table.column("sample_id").to_numpy().astype(np.int64),
        labels=table.column("label").to_numpy().astype(np.int64),
        images=images.reshape((-1, *IMAGE_SHAPE)).astype(np.float32, copy=False),
        metadata=meta,
    )


def list_shards(spec: str) -> list[str]:
    """Shard files named by ``spec``: a folder, a glob, one file, or a URI; sorted.

    TTTPipeError if nothing matches (the message names ``spec``).
    """
    uris = storage.list_files(spec, SUFFIX)
    if not uris:
        raise TTTPipeError(f"no shards found at '{spec}'; pass a folder, glob or file made by "
                           "ttt-pipe corrupt")
    return uris


def validate_table(table: pa.Table, uri: str) -> dict:
    """Check a shard table; return its decoded metadata. TTTPipeError names what is wrong."""
    expected = [(f.name, f.type) for f in SCHEMA]
    found = [(f.name, f.type) for f in table.schema]
    if found != expected:
        missing = [n for n, _ in expected if n not in table.schema.names]
        detail = (f"missing columns {', '.join(missing)}" if missing else
                  "columns " + ", ".join(f"{n}: {t}" for n, t in found))
        raise TTTPipeError(f"'{uri}' is not a ttt-pipe shard (schema v{SCHEMA_VERSION}): "
                           f"{detail}; regenerate it with ttt-pipe corrupt")
    meta = _decode_metadata(table, uri)
    if table.num_rows == 0:
        raise TTTPipeError(f"shard '{uri}' is empty; regenerate it with ttt-pipe corrupt")
    nulls = [c for c in SCHEMA.names if table.column(c).null_count]
    if nulls:
        raise TTTPipeError(f"shard '{uri}' has missing values in {', '.join(nulls)}; "
                           "regenerate it with ttt-pipe corrupt")
    pixels = table.column("image").combine_chunks().flatten().to_numpy()
    if not np.isfinite(pixels).all():
        bad = int(np.count_nonzero(~np.isfinite(pixels)))
        raise TTTPipeError(f"shard '{uri}' has {bad} NaN or infinite pixels; "
                           "regenerate it with ttt-pipe corrupt")
    for column, value in (("corruption", meta["corruption"]), ("severity", meta["severity"])):
        values = table.column(column).unique().to_pylist()
        if values != [value]:
            raise TTTPipeError(f"shard '{uri}' mixes {column} values {values[:5]} (metadata "
                               f"says {value!r}); a shard holds one corruption and severity")
    return meta


def _decode_metadata(table: pa.Table, uri: str) -> dict:
    raw = table.schema.metadata or {}
    meta: dict = {}
    for key in METADATA_KEYS:
        value = raw.get((META_PREFIX + key).encode())
        if value is None:
            raise TTTPipeError(f"shard '{uri}' lacks metadata {META_PREFIX}{key}; "
                               "regenerate it with ttt-pipe corrupt")
        try:
            meta[key] = json.loads(value)
        except ValueError:
            raise TTTPipeError(f"shard '{uri}' has unreadable metadata {META_PREFIX}{key}; "
                               "regenerate it with ttt-pipe corrupt") from None
    if meta["schema_version"] != SCHEMA_VERSION:
        raise TTTPipeError(f"shard '{uri}' has schema version {meta['schema_version']}, this "
                           f"ttt-pipe reads {SCHEMA_VERSION}; regenerate it with ttt-pipe corrupt")
    if meta["image_shape"] != list(IMAGE_SHAPE):
        raise TTTPipeError(f"shard '{uri}' holds images of shape {meta['image_shape']}, "
                           f"expected {list(IMAGE_SHAPE)}; regenerate it with ttt-pipe corrupt")
    return meta


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
