"""pipeline.storage on real local files, through plain paths and file:// URIs."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.errors import TTTPipeError


def test_join_keeps_uris_and_paths():
    assert storage.join("s3://bucket/run", "shards", "a.parquet") == "s3://bucket/run/shards/a.parquet"
    assert storage.join("/tmp/x", "a") == os.path.join("/tmp/x", "a")
    assert storage.basename("gs://b/dir/f.parquet") == "f.parquet"
    assert storage.is_uri("file:///tmp") and not storage.is_uri("/tmp")


def test_atomic_writes_and_reads(tmp_path):
    storage.makedirs(str(tmp_path / "a" / "b"))
    uri = f"file://{tmp_path}/a/b/t.parquet"
    storage.atomic_write_table(pa.table({"x": [1, 2]}), uri, metadata={"k": "v"})
    table = pq.read_table(tmp_path / "a" / "b" / "t.parquet")
    assert table.column("x").to_pylist() == [1, 2]
    assert table.schema.metadata[b"k"] == b"v"
    storage.atomic_write_bytes(b"hello", str(tmp_path / "a" / "f.txt"))
    assert storage.read_bytes(f"file://{tmp_path}/a/f.txt") == b"hello"
    storage.atomic_write_bytes(b"again", str(tmp_path / "a" / "f.txt"))  # replaces
    assert storage.read_bytes(str(tmp_path / "a" / "f.txt")) == b"again"
    assert storage.exists(str(tmp_path / "a")) and storage.is_dir(str(tmp_path / "a"))
    assert sorted(os.listdir(tmp_path / "a")) == ["b", "f.txt"]  # no temp files left
    storage.remove(str(tmp_path / "a" / "f.txt"))
    assert not storage.exists(str(tmp_path / "a" / "f.txt"))


def test_failed_write_leaves_nothing(tmp_path):
    class Boom(Exception):
        pass

    def write(sink):
        sink.write(b"partial")
        raise Boom

    with pytest.raises(Boom):
        storage._atomic_write(str(tmp_path / "x.bin"), write)
    assert os.listdir(tmp_path) == []


def test_unwritable_locations_are_one_line_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(TTTPipeError, match="cannot create directory") as err:
        storage.makedirs(str(tmp_path / "file" / "sub"))
    assert "\n" not in str(err.value)
    with pytest.raises(TTTPipeError, match="cannot write"):
        storage.atomic_write_bytes(b"x", str(tmp_path / "file" / "y"))
    with pytest.raises(TTTPipeError, match="no such file"):
        storage.read_bytes(str(tmp_path / "absent"))


def test_list_files_dir_glob_file_uri(tmp_path):
    for rel in ("a-1.parquet", "a-2.parquet", "b-1.parquet", "note.txt", ".a-3.parquet.tmp",
                ".hidden.parquet", "sub/c-1.parquet"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text("x")
    d = str(tmp_path)
    names = lambda uris: [storage.basename(u) for u in uris]  # noqa: E731
    assert names(storage.list_files(d, ".parquet")) == ["a-1.parquet", "a-2.parquet", "b-1.parquet"]
    assert names(storage.list_files(f"{d}/a-*.parquet")) == ["a-1.parquet", "a-2.parquet"]
    assert names(storage.list_files(f"{d}/*/*.parquet")) == ["c-1.parquet"]
    assert len(storage.list_files(f"{d}/**/*.parquet")) == 4
    assert storage.list_files(f"{d}/note.txt", ".parquet") == [f"{d}/note.txt"]
    assert storage.list_files(f"file://{d}/b-*") == [f"file://{d}/b-1.parquet"]
    assert storage.list_files(f"{d}/nothing*") == [] and storage.list_files(f"{d}/absent") == []


@pytest.fixture
def object_store(monkeypatch):
    """``mock://bucket/...`` URIs on pyarrow's in-memory mock filesystem: the object-store
    code path (single PUT, no rename) without a network."""
    import pyarrow.fs as pafs

    fs = pafs._MockFileSystem()
    real = storage.resolve

    def resolve(uri):
        uri = str(uri)
        return (fs, uri.removeprefix("mock://")) if uri.startswith("mock://") else real(uri)

    monkeypatch.setattr(storage, "resolve", resolve)
    return fs


def test_object_store_code_path(object_store, idx_dir):
    from pipeline.shard_maker import make_shards
    from pipeline.shards import list_shards, read_shard

    storage.makedirs("mock://bucket/x")
    storage.atomic_write_bytes(b"abc", "mock://bucket/x/f.bin")
    assert storage.read_bytes("mock://bucket/x/f.bin") == b"abc"
    assert storage.list_files("mock://bucket/x") == ["mock://bucket/x/f.bin"]
    summary = make_shards("mnist", "mock://bucket/shards", "fog", "2",
                          data_dir=idx_dir / "mnist", shard_size=16)
    assert list_shards("mock://bucket/shards/fog-*") == [
        "mock://bucket/shards/fog-s2-00000.parquet", "mock://bucket/shards/fog-s2-00001.parquet"]
    assert summary.shards[0] == "mock://bucket/shards/identity-s0-00000.parquet"
    assert len(read_shard(summary.shards[-1])) == 16


def test_object_store_failed_write_publishes_nothing(object_store):
    storage.makedirs("mock://bucket")

    def write(sink):
        sink.write(b"partial")
        raise RuntimeError("serialiser crashed")

    with pytest.raises(RuntimeError):
        storage._atomic_write("mock://bucket/y.bin", write)
    assert not storage.exists("mock://bucket/y.bin")
