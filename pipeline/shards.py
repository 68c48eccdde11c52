"""Shards: Parquet files of (corrupted) test images, one (corruption, severity) per file.

Schema version 2 (see docs/contracts.md): ``sample_id int64`` (index in the source split),
``label int16`` (null for unlabelled data), ``image fixed_size_list<uint8 | float32>[C*H*W]``
(row-major C x H x W; uint8 for 8-bit images, float32 pixel units where values must survive
exactly, e.g. the mnist-c suite's unclipped noise), ``corruption string``, ``severity int8``
(0 for ``identity``), ``shard string`` (the file's stem). The Parquet key-value metadata holds
``ttt_pipe.<key>`` = JSON for :data:`METADATA_KEYS` -- and no timestamp, so the same input
gives byte-identical files. Files are named ``<corruption>-s<severity>-<index:05d>.parquet``
and written atomically through :mod:`pipeline.storage` (local paths and ``s3://``/``gs://``).

Two readers:

- :func:`read_shard_footer` reads only the Parquet footer (schema, row count, key-value
  metadata, column statistics): what the driver of ``ttt-pipe adapt`` checks for every shard,
  without touching a pixel.
- :func:`read_shard` reads the whole file and also checks the content (NaN pixels, duplicate
  sample ids, mixed corruption values): what the actor that adapts the shard does.

Version 1 files (float32 1x28x28, scalar mean/std, no null labels) still read; their
metadata is presented in the version 2 form (``image_dtype`` float32, suite ``mnist-c``,
one-element mean/std lists).

Making a whole set of shards from a dataset is :func:`pipeline.shard_maker.make_shards`.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import TTTPipeError

__all__ = ["SCHEMA_VERSION", "READABLE_VERSIONS", "IMAGE_DTYPES", "META_PREFIX",
           "METADATA_KEYS", "SUFFIX", "Shard", "ShardFooter", "shard_schema", "shard_name",
           "shard_table", "shard_metadata", "write_shard", "read_shard", "read_shard_table",
           "read_shard_footer", "list_shards", "validate_table", "check_content", "to_pixels",
           "suite_of_shape"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
IMAGE_DTYPES = ("uint8", "float32")
SUFFIX = ".parquet"
META_PREFIX = "ttt_pipe."
METADATA_KEYS = ("schema_version", "image_shape", "image_dtype", "dataset", "suite", "mean",
                 "std", "seed", "corruption", "severity", "labelled", "shuffle_seed", "source")
_V1_KEYS = ("schema_version", "image_shape", "dataset", "mean", "std", "seed", "corruption",
            "severity")
_V1_SHAPE = (1, 28, 28)  # the only shape version 1 knew
_REQUIRED = ("sample_id", "image", "corruption", "severity", "shard")  # never null
_FIX = "regenerate it with ttt-pipe corrupt or import-corrupted"
# Pixel encoding, chosen from the pixels themselves (so still deterministic): float images
# with few distinct values are ~3x smaller dictionary-encoded; continuous ones (noise, blur)
# ~20% smaller as byte-stream-split floats (zstd then sees the exponents). uint8 images stay
# dictionary-encoded (<= 256 values: one byte per pixel before zstd).
_DICTIONARY_MAX_VALUES = 1 << 16
_CONTINUOUS_OPTIONS = {"use_byte_stream_split": ["image.list.element"],
                       "use_dictionary": ["corruption", "shard"]}


def shard_schema(image_shape: Sequence[int], image_dtype: str = "float32") -> pa.Schema:
    """The Arrow schema of a shard of ``image_shape`` (C, H, W) images of ``image_dtype``."""
    return _shard_schema(tuple(int(v) for v in image_shape), image_dtype)


@functools.lru_cache(maxsize=64)
def _shard_schema(image_shape: tuple[int, ...], image_dtype: str) -> pa.Schema:
    size = int(np.prod(image_shape))
    value = {"uint8": pa.uint8(), "float32": pa.float32()}[image_dtype]
    return pa.schema([
        ("sample_id", pa.int64()),
        ("label", pa.int16()),
        ("image", pa.list_(value, size)),
        ("corruption", pa.string()),
        ("severity", pa.int8()),
        ("shard", pa.string()),
    ])


def suite_of_shape(image_shape: Sequence[int]) -> str:
    """The corruption suite of images of this shape: grayscale -> mnist-c, RGB -> imagenet-c."""
    return "mnist-c" if int(image_shape[0]) == 1 else "imagenet-c"


def to_pixels(images: np.ndarray) -> np.ndarray:
    """Stored images -> float32 pixel units: uint8 / 255 (as the datasets' ``to_float``);
    float32 unchanged (no copy)."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255.0)
    if images.dtype == np.float32:
        return images
    raise TTTPipeError(f"shard images must be uint8 or float32, got {images.dtype}")


@dataclass(frozen=True)
class Shard:
    """One shard in memory. ``images`` keep the stored dtype (uint8 or float32, (N, C, H, W));
    :meth:`pixels` gives float32 pixel units for a model."""

    name: str
    corruption: str
    severity: int
    sample_ids: np.ndarray  # (N,) int64
    labels: np.ndarray | None  # (N,) int64; None for unlabelled data
    images: np.ndarray  # (N, C, H, W) uint8 or float32
    metadata: dict = field(default_factory=dict)  # decoded ttt_pipe.* keys (version 2 form)

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def pixels(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """float32 pixel units of rows ``start:stop`` (a fresh array for uint8 storage)."""
        return to_pixels(self.images[start:stop])


@dataclass(frozen=True)
class ShardFooter:
    """What a shard's Parquet footer says: enough to plan a run without reading pixels."""

    uri: str
    name: str  # the file stem (== the ``shard`` column)
    rows: int
    metadata: dict  # decoded ttt_pipe.* keys, version 2 form (v1 files converted)
    min_id: int | None  # sample_id range from the column statistics (None if not written)
    max_id: int | None

    @property
    def schema_version(self) -> int:
        return int(self.metadata["schema_version"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.metadata["image_shape"])

    @property
    def dataset(self) -> str:
        return self.metadata["dataset"]

    @property
    def corruption(self) -> str:
        return self.metadata["corruption"]

    @property
    def severity(self) -> int:
        return int(self.metadata["severity"])

    @property
    def labelled(self) -> bool:
        return bool(self.metadata["labelled"])


def shard_name(corruption: str, severity: int, index: int) -> str:
    """``gaussian_noise-s5-00000``: the file stem (and ``shard`` column) of a shard."""
    return f"{corruption}-s{int(severity)}-{int(index):05d}"


def _per_channel(name: str, value, channels: int) -> list[float]:
    values = [float(v) for v in np.atleast_1d(np.asarray(value, dtype=np.float64))]
    if len(values) == 1 and channels > 1:
        values = values * channels
    if len(values) != channels:
        raise TTTPipeError(f"shard {name} needs {channels} values (one per channel), got {value!r}")
    return values


def shard_metadata(*, dataset: str, image_shape: Sequence[int], image_dtype: str,
                   mean: float | Sequence[float], std: float | Sequence[float], seed: int,
                   corruption: str, severity: int, suite: str | None = None,
                   labelled: bool = True, shuffle_seed: int | None = None,
                   source: str = "corrupt") -> dict[str, str]:
    """The ``ttt_pipe.*`` key-value metadata of a version 2 shard (values JSON-encoded).

    ``suite`` defaults to the suite of ``image_shape``; ``shuffle_seed`` is the seed of the
    row shuffle (``import-corrupted``; None: rows in sample id order); ``source`` names what
    made the shard (``corrupt``, ``import:cifar-c``, ``import:imagenet-c``).
    """
    shape = [int(v) for v in image_shape]
    if len(shape) != 3 or shape[0] not in (1, 3) or min(shape) < 1:
        raise TTTPipeError(f"image shape {tuple(shape)} is not (C, H, W) with C 1 or 3")
    if image_dtype not in IMAGE_DTYPES:
        raise TTTPipeError(f"image dtype {image_dtype!r} is not one of {', '.join(IMAGE_DTYPES)}")
    values = {"schema_version": SCHEMA_VERSION, "image_shape": shape, "image_dtype": image_dtype,
              "dataset": str(dataset), "suite": str(suite or suite_of_shape(shape)),
              "mean": _per_channel("mean", mean, shape[0]),
              "std": _per_channel("std", std, shape[0]), "seed": int(seed),
              "corruption": str(corruption), "severity": int(severity),
              "labelled": bool(labelled),
              "shuffle_seed": None if shuffle_seed is None else int(shuffle_seed),
              "source": str(source)}
    return {META_PREFIX + k: json.dumps(values[k]) for k in METADATA_KEYS}


def _image_dtype(images: np.ndarray) -> str:
    if images.dtype == np.uint8:
        return "uint8"
    if images.dtype == np.float32:
        return "float32"
    raise TTTPipeError(f"shard images must be uint8 or float32 (N, C, H, W), got {images.dtype}")


def shard_table(sample_ids: np.ndarray, labels: np.ndarray | None, images: np.ndarray, *,
                name: str, corruption: str, severity: int,
                metadata: dict[str, str] | None = None) -> pa.Table:
    """Arrays -> a shard table (plus ``metadata`` if given). ``images`` (N, C, H, W) uint8
    or float32 keep their dtype; ``labels`` None -> a null ``label`` column."""
    sample_ids = np.asarray(sample_ids, dtype=np.int64)
    images = np.asarray(images)
    n = len(sample_ids)
    if images.ndim != 4 or len(images) != n or (labels is not None and np.shape(labels) != (n,)):
        raise TTTPipeError(f"shard {name}: expected {n} labels and images of shape (N, C, H, W), "
                           f"got {None if labels is None else np.shape(labels)} and {images.shape}")
    dtype = _image_dtype(images)
    schema = shard_schema(images.shape[1:], dtype)
    size = int(np.prod(images.shape[1:]))
    flat = np.ascontiguousarray(images).reshape(-1)
    label = (pa.nulls(n, pa.int16()) if labels is None
             else pa.array(np.asarray(labels).astype(np.int16), pa.int16()))
    columns = [
        pa.array(sample_ids, pa.int64()),
        label,
        pa.FixedSizeListArray.from_arrays(pa.array(flat), size),
        pa.array([corruption] * n, pa.string()),
        pa.array(np.full(n, severity, dtype=np.int8), pa.int8()),
        pa.array([name] * n, pa.string()),
    ]
    return pa.Table.from_arrays(columns, schema=schema.with_metadata(metadata) if metadata else schema)


def write_shard(uri: str, sample_ids: np.ndarray, labels: np.ndarray | None, images: np.ndarray,
                *, corruption: str, severity: int, dataset: str,
                mean: float | Sequence[float], std: float | Sequence[float], seed: int,
                suite: str | None = None, shuffle_seed: int | None = None,
                source: str = "corrupt") -> str:
    """Validate and atomically write one shard to ``uri`` (``.../<name>.parquet``).

    ``images`` (N, C, H, W): uint8 (8-bit data) or float32 pixel units; stored as given.
    """
    name = storage.basename(uri).removesuffix(SUFFIX)
    images = np.asarray(images)
    if images.ndim != 4:
        raise TTTPipeError(f"shard {name}: images must be (N, C, H, W), got shape {images.shape}")
    metadata = shard_metadata(dataset=dataset, image_shape=images.shape[1:],
                              image_dtype=_image_dtype(images), mean=mean, std=std, seed=seed,
                              corruption=corruption, severity=severity, suite=suite,
                              labelled=labels is not None, shuffle_seed=shuffle_seed,
                              source=source)
    table = shard_table(sample_ids, labels, images, name=name, corruption=corruption,
                        severity=severity, metadata=metadata)
    validate_table(table, uri)
    options = {}
    if images.dtype == np.float32 and len(np.unique(images)) > _DICTIONARY_MAX_VALUES:
        options = _CONTINUOUS_OPTIONS
    storage.atomic_write_table(table, uri, **options)
    log.debug("wrote shard %s (%d rows)", uri, table.num_rows)
    return uri


def _open_error(uri: str, exc: BaseException) -> TTTPipeError:
    if isinstance(exc, FileNotFoundError):
        return TTTPipeError(f"no such shard: '{uri}'; list them with ls or rerun ttt-pipe corrupt")
    return TTTPipeError(f"cannot read shard '{uri}': not a valid Parquet file "
                        f"({_one_line(exc)}); {_FIX}")


def read_shard_footer(uri: str) -> ShardFooter:
    """Read and check one shard's footer only (no pixels): schema, metadata, row count,
    null counts and sample id / corruption / severity / name ranges from the statistics."""
    fs, path = storage.resolve(uri)
    try:
        with fs.open_input_file(path) as f:
            footer = pq.read_metadata(f)
    except (FileNotFoundError, pa.ArrowException, OSError) as exc:
        raise _open_error(uri, exc) from None
    try:
        schema = footer.schema.to_arrow_schema()
    except (pa.ArrowException, ValueError) as exc:
        raise _open_error(uri, exc) from None
    meta = _check_schema(schema, footer.num_rows, uri)
    stats = _column_stats(footer)
    name = storage.basename(uri).removesuffix(SUFFIX)
    nulls = [c for c in _REQUIRED if stats[c]["nulls"]]
    if nulls:
        raise TTTPipeError(f"shard '{uri}' has missing values in {', '.join(nulls)}; {_FIX}")
    _check_label_nulls(stats["label"]["nulls"], footer.num_rows, meta, uri)
    for column, value in (("corruption", meta["corruption"]), ("severity", meta["severity"]),
                          ("shard", None)):
        lo, hi = stats[column]["min"], stats[column]["max"]
        if lo is None:
            continue
        if lo != hi or (value is not None and lo != value):
            raise TTTPipeError(f"shard '{uri}' mixes {column} values {sorted({lo, hi})} (metadata "
                               f"says {value!r}); a shard holds one corruption and severity")
    min_id, max_id = stats["sample_id"]["min"], stats["sample_id"]["max"]
    if min_id is not None and min_id < 0:
        raise TTTPipeError(f"shard '{uri}' has negative sample ids; {_FIX}")
    return ShardFooter(uri=str(uri), name=name, rows=footer.num_rows, metadata=meta,
                       min_id=min_id, max_id=max_id)


def _column_stats(footer: pq.FileMetaData) -> dict[str, dict]:
    """{column: {"nulls": total or 0, "min", "max" over row groups or None}} of the
    non-pixel columns (the schema was checked before: the leaf order is known)."""
    out: dict[str, dict] = {"image": {"nulls": 0, "min": None, "max": None}}
    # leaf columns in schema order: sample_id, label, image.list.element, corruption, severity, shard
    for j, column in enumerate(("sample_id", "label", None, "corruption", "severity", "shard")):
        if column is None:
            continue  # the pixels' statistics are not needed
        nulls, lo, hi, known = 0, None, None, footer.num_row_groups > 0
        for g in range(footer.num_row_groups):
            s = footer.row_group(g).column(j).statistics
            if s is None:
                known = False
                continue
            nulls += s.null_count if s.has_null_count else 0
            if not s.has_min_max:
                known = False
                continue
            lo = s.min if lo is None else min(lo, s.min)
            hi = s.max if hi is None else max(hi, s.max)
        out[column] = {"nulls": nulls, "min": lo if known else None, "max": hi if known else None}
    return out


def _check_label_nulls(nulls: int, rows: int, meta: dict, uri: str) -> None:
    labelled = bool(meta["labelled"])
    if nulls and (labelled or nulls != rows):
        raise TTTPipeError(f"shard '{uri}' has {nulls} missing labels of {rows} (metadata says "
                           f"{'labelled' if labelled else 'unlabelled'}); a shard is labelled "
                           f"throughout or not at all; {_FIX}")
    if not labelled and nulls != rows:
        raise TTTPipeError(f"shard '{uri}' is marked unlabelled but has labels; {_FIX}")


def read_shard_table(uri: str) -> pa.Table:
    """Read and validate one shard (footer and content checks) as an Arrow table."""
    fs, path = storage.resolve(uri)
    try:
        table = pq.read_table(path, filesystem=fs)
    except (FileNotFoundError, pa.ArrowException, OSError) as exc:
        raise _open_error(uri, exc) from None
    validate_table(table, uri)
    return table


def read_shard(uri: str) -> Shard:
    """Read, validate (footer and content) and convert one shard to numpy arrays."""
    table = read_shard_table(uri)
    meta = _decode_metadata(table.schema, uri)
    shape = tuple(meta["image_shape"])
    images = table.column("image").combine_chunks().flatten().to_numpy()
    labels = None
    if meta["labelled"]:
        labels = table.column("label").to_numpy().astype(np.int64)
    return Shard(
        name=table.column("shard")[0].as_py(),
        corruption=meta["corruption"],
        severity=int(meta["severity"]),
        sample_ids=table.column("sample_id").to_numpy().astype(np.int64),
        labels=labels,
        images=images.reshape((-1, *shape)),
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
    """Check a shard table (schema, metadata, then content); return its decoded metadata."""
    meta = _check_schema(table.schema, table.num_rows, uri)
    check_content(table, meta, uri)
    return meta


def check_content(table: pa.Table, meta: dict, uri: str) -> None:
    """The checks that need the data: nulls, NaN pixels, duplicate sample ids, one corruption,
    severity and name per shard. TTTPipeError (one line, naming ``uri``)."""
    nulls = [c for c in _REQUIRED if table.column(c).null_count]
    if nulls:
        raise TTTPipeError(f"shard '{uri}' has missing values in {', '.join(nulls)}; {_FIX}")
    _check_label_nulls(table.column("label").null_count, table.num_rows, meta, uri)
    if meta["image_dtype"] == "float32":
        pixels = table.column("image").combine_chunks().flatten().to_numpy()
        if not np.isfinite(pixels).all():
            bad = int(np.count_nonzero(~np.isfinite(pixels)))
            raise TTTPipeError(f"shard '{uri}' has {bad} NaN or infinite pixels; {_FIX}")
    ids = table.column("sample_id").to_numpy()
    if np.unique(ids).size != ids.size:
        raise TTTPipeError(f"shard '{uri}' repeats sample ids; {_FIX}")
    if ids.size and ids.min() < 0:
        raise TTTPipeError(f"shard '{uri}' has negative sample ids; {_FIX}")
    for column, value in (("corruption", meta["corruption"]), ("severity", meta["severity"])):
        values = table.column(column).unique().to_pylist()
        if values != [value]:
            raise TTTPipeError(f"shard '{uri}' mixes {column} values {values[:5]} (metadata "
                               f"says {value!r}); a shard holds one corruption and severity")
    names = table.column("shard").unique().to_pylist()
    if len(names) != 1:
        raise TTTPipeError(f"shard '{uri}' mixes shard names {names[:5]}; {_FIX}")


def _check_schema(schema: pa.Schema, rows: int, uri: str) -> dict:
    """Schema + metadata + row count (no data); the decoded metadata, version 2 form."""
    names = [f.name for f in schema]
    expected = shard_schema((1, 1, 1)).names
    missing = [n for n in expected if n not in names]
    if missing or names != expected:
        detail = (f"missing columns {', '.join(missing)}" if missing else
                  "columns " + ", ".join(f"{f.name}: {f.type}" for f in schema))
        raise TTTPipeError(f"'{uri}' is not a ttt-pipe shard (schema v{SCHEMA_VERSION}): "
                           f"{detail}; {_FIX}")
    meta = _decode_metadata(schema, uri)
    want = shard_schema(meta["image_shape"], meta["image_dtype"])
    found = [(f.name, f.type) for f in schema]
    if found != [(f.name, f.type) for f in want]:
        raise TTTPipeError(f"'{uri}' is not a ttt-pipe shard (schema v{meta['schema_version']}): "
                           "columns " + ", ".join(f"{n}: {t}" for n, t in found) +
                           f" do not match its metadata ({meta['image_dtype']} images of shape "
                           f"{meta['image_shape']}); {_FIX}")
    if rows == 0:
        raise TTTPipeError(f"shard '{uri}' is empty; {_FIX}")
    return meta


def _decode_metadata(schema: pa.Schema, uri: str) -> dict:
    raw = schema.metadata or {}
    items = tuple(sorted((k, v) for k, v in raw.items() if k.startswith(_PREFIX_BYTES)))
    try:
        meta = _decode_items(items)
    except _MetadataError as exc:
        raise TTTPipeError(f"shard '{uri}' {exc.args[0]}; {_FIX}") from None
    return {k: list(v) if isinstance(v, list) else v for k, v in meta.items()}


_PREFIX_BYTES = META_PREFIX.encode()


class _MetadataError(Exception):
    """What is wrong with a shard's metadata (the caller adds the shard's uri)."""


@functools.lru_cache(maxsize=1024)
def _decode_items(items: tuple[tuple[bytes, bytes], ...]) -> dict:
    """Decoded and checked ``ttt_pipe.*`` metadata, version 2 form. Cached: the shards of one
    set share their metadata, so thousands of footers cost one JSON decode."""
    raw = dict(items)

    def get(key: str):
        value = raw.get((META_PREFIX + key).encode())
        if value is None:
            raise _MetadataError(f"lacks metadata {META_PREFIX}{key}")
        try:
            return json.loads(value)
        except ValueError:
            raise _MetadataError(f"has unreadable metadata {META_PREFIX}{key}") from None

    version = get("schema_version")
    if version not in READABLE_VERSIONS:
        raise _MetadataError(f"has schema version {version}, this ttt-pipe reads "
                             f"{', '.join(map(str, READABLE_VERSIONS))}")
    if version == 1:
        meta = {key: get(key) for key in _V1_KEYS}
        if meta["image_shape"] != list(_V1_SHAPE):
            raise _MetadataError(f"(schema v1) holds images of shape {meta['image_shape']}, "
                                 f"v1 knew only {list(_V1_SHAPE)}")
        meta.update(image_dtype="float32", suite="mnist-c", mean=[float(meta["mean"])],
                    std=[float(meta["std"])], labelled=True, shuffle_seed=None, source="corrupt")
        return {key: meta[key] for key in METADATA_KEYS}
    meta = {key: get(key) for key in METADATA_KEYS}
    shape = meta["image_shape"]
    if (not isinstance(shape, list) or len(shape) != 3 or
            not all(isinstance(v, int) and v > 0 for v in shape) or shape[0] not in (1, 3)):
        raise _MetadataError(f"has image shape {shape!r}, expected [C, H, W] with C 1 or 3")
    if meta["image_dtype"] not in IMAGE_DTYPES:
        raise _MetadataError(f"has image dtype {meta['image_dtype']!r}, expected one of "
                             f"{', '.join(IMAGE_DTYPES)}")
    for key in ("mean", "std"):
        if not isinstance(meta[key], list) or len(meta[key]) != shape[0]:
            raise _MetadataError(f"has {key} {meta[key]!r}, expected {shape[0]} per-channel values")
    return meta


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
