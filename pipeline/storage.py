"""One code path for local paths and cloud URIs (``s3://``, ``gs://``, ``file://``).

Everything that reads or writes artifacts (shards, checkpoints, results) goes through these
helpers, built on :mod:`pyarrow.fs`, so a cluster whose workers only share object storage runs
the same code as a laptop. A *uri* is either a plain local path (``~`` expanded, made absolute)
or ``scheme://...`` understood by ``pyarrow.fs.FileSystem.from_uri``.

Writes are atomic: a local file is written to a hidden temporary file in the same folder,
flushed, fsync'ed and renamed over the target with :func:`os.replace`; on an object store a
single PUT is already all-or-nothing. Readers therefore never see half a file, and a crash
leaves no temporary file behind (it is removed on every error path).

Failures are raised as :class:`~pipeline.errors.TTTPipeError` with one-line messages.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import tempfile
from collections.abc import Mapping

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import TTTPipeError

__all__ = [
    "is_uri", "resolve", "join", "basename", "exists", "is_dir", "makedirs", "remove",
    "list_files", "read_bytes", "atomic_write_bytes", "atomic_write_table", "PARQUET_OPTIONS",
]

# Pinned writer options: the same table gives the same bytes (no timestamps are written;
# `created_by` names the pyarrow version, so bytes match for one pyarrow version).
PARQUET_OPTIONS: dict = {
    "version": "2.6",
    "data_page_version": "1.0",
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": True,
    "write_statistics": True,
    "row_group_size": 1 << 20,
    "store_schema": True,
}

_GLOB_CHARS = "*?["


def is_uri(uri: str) -> bool:
    """True for ``scheme://...`` (including ``file://``), False for a plain local path."""
    return "://" in str(uri)


def _local(path: str) -> str:
    return os.path.abspath(os.path.expanduser(str(path)))


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path inside it)`` for a local path or a URI."""
    uri = str(uri)
    if not uri:
        raise TTTPipeError("empty path; pass a local folder or a URI such as s3://bucket/dir")
    if not is_uri(uri):
        return pafs.LocalFileSystem(), _local(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as exc:
        raise TTTPipeError(f"cannot open '{uri}': {_one_line(exc)}; "
                           "check the URI (local path, s3://, gs:// or file://), credentials and network") from None


def join(uri: str, *parts: str) -> str:
    """Join path parts, keeping a URI a URI (``s3://b/x`` + ``y`` -> ``s3://b/x/y``)."""
    uri = str(uri)
    if is_uri(uri):
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest, *parts) if rest else f"{scheme}://" + "/".join(parts)
    return os.path.join(uri, *parts)


def basename(uri: str) -> str:
    """The last path component of a local path or a URI."""
    return posixpath.basename(str(uri).rstrip("/")) if is_uri(uri) else os.path.basename(str(uri))


def _info(uri: str) -> pafs.FileInfo:
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise TTTPipeError(f"cannot access '{uri}': {_one_line(exc)}") from None


def exists(uri: str) -> bool:
    """True if a file or directory exists at ``uri``."""
    return _info(uri).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    """True if ``uri`` is a directory (on object stores: a non-empty prefix or a marker)."""
    return _info(uri).type == pafs.FileType.Directory


def makedirs(uri: str) -> None:
    """Create a directory and its parents (no-op if it exists); TTTPipeError if impossible."""
    fs, path = resolve(uri)
    try:
        fs.create_dir(path, recursive=True)
        info = fs.get_file_info(path)
    except (OSError, pa.ArrowException) as exc:
        raise TTTPipeError(f"cannot create directory '{uri}': {_one_line(exc)}; "
                           "choose a writable location") from None
    if info.type == pafs.FileType.File:
        raise TTTPipeError(f"cannot create directory '{uri}': a file is in the way; "
                           "choose another location")


def remove(uri: str, missing_ok: bool = True) -> None:
    """Delete one file."""
    fs, path = resolve(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        if not missing_ok:
            raise TTTPipeError(f"cannot delete '{uri}': no such file") from None
    except OSError as exc:
        raise TTTPipeError(f"cannot delete '{uri}': {_one_line(exc)}") from None


def list_files(spec: str, suffix: str = "") -> list[str]:
    """Files named by ``spec``, sorted, in the same form as ``spec`` (path or URI).

    ``spec`` may be a directory (its direct children ending in ``suffix``), a glob
    (``dir/*.parquet``, ``s3://b/shards/gauss*``; ``**`` matches across folders) or a single
    file (returned as is, whatever its suffix). Hidden files (``.name``, e.g. temporary
    files of an unfinished write) are never listed. Nothing matched -> ``[]``.
    """
    spec = str(spec)
    scheme = spec.split("://", 1)[0] + "://" if is_uri(spec) else ""
    fs, path = resolve(spec)

    def _uri(p: str) -> str:
        return _as_uri(scheme, spec, p)

    if any(ch in path for ch in _GLOB_CHARS):
        parts = path.split("/")
        first = next(i for i, part in enumerate(parts) if any(ch in part for ch in _GLOB_CHARS))
        base = "/".join(parts[:first]) or "/"
        recursive = "**" in path or first < len(parts) - 1
        pattern = path.replace("**/", "*").replace("**", "*")
        infos = _select(fs, base, recursive)
        found = [i.path for i in infos if i.type == pafs.FileType.File
                 and fnmatch.fnmatchcase(i.path, pattern) and not _hidden(i.path)
                 and ("**" in path or i.path.count("/") == path.count("/"))]
        return sorted(_uri(p) for p in found if p.endswith(suffix))
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [spec]
    if info.type == pafs.FileType.Directory:
        return sorted(_uri(i.path) for i in _select(fs, path, False)
                      if i.type == pafs.FileType.File and i.path.endswith(suffix)
                      and not _hidden(i.path))
    return []


def read_bytes(uri: str) -> bytes:
    """The whole content of one file."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise TTTPipeError(f"no such file: '{uri}'") from None
    except OSError as exc:
        raise TTTPipeError(f"cannot read '{uri}': {_one_line(exc)}") from None


def atomic_write_bytes(data: bytes, uri: str) -> None:
    """Write ``data`` to ``uri`` so that readers see the old file or the whole new one."""
    _atomic_write(uri, lambda sink: sink.write(data))


def atomic_write_table(table: pa.Table, uri: str, metadata: Mapping[str, str] | None = None,
                       **options) -> None:
    """Write ``table`` as Parquet to ``uri`` atomically.

    ``metadata`` (str -> str) is merged into the schema's key-value metadata. Writer options
    default to :data:`PARQUET_OPTIONS` (pinned for byte-identical output); ``options``
    override them.
    """
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    opts = {**PARQUET_OPTIONS, **options}
    _atomic_write(uri, lambda sink: pq.write_table(table, sink, **opts))


def _atomic_write(uri: str, write) -> None:
    fs, path = resolve(uri)
    if not isinstance(fs, pafs.LocalFileSystem):
        # Serialise in memory first, then one PUT: a failure while serialising never reaches
        # the store (closing a stream there would publish the partial object).
        buffer = pa.BufferOutputStream()
        write(buffer)
        data = buffer.getvalue()
        try:
            with fs.open_output_stream(path) as sink:
                sink.write(data)
        except OSError as exc:
            raise TTTPipeError(f"cannot write '{uri}': {_one_line(exc)}") from None
        return
    folder, name = os.path.split(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise TTTPipeError(f"cannot write '{uri}': {_one_line(exc)}; "
                           "choose a writable location") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; finished files get the usual mode
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise TTTPipeError(f"cannot write '{uri}': {_one_line(exc)}") from None
        raise


def _select(fs: pafs.FileSystem, base: str, recursive: bool) -> list[pafs.FileInfo]:
    try:
        return fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=recursive))
    except OSError as exc:
        raise TTTPipeError(f"cannot list '{base}': {_one_line(exc)}") from None


def _as_uri(scheme: str, spec: str, path: str) -> str:
    if not scheme:
        return path
    if scheme == "file://":
        return "file://" + path
    return scheme + path.lstrip("/")


def _hidden(path: str) -> bool:
    return posixpath.basename(path).startswith(".")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
