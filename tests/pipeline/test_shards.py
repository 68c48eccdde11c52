"""Shard schema round trip, validation of bad files, and make_shards on real Parquet files."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import shard_maker
from pipeline.errors import TTTPipeError
from pipeline.shard_maker import make_shards, plan_shards
from pipeline.shards import (SCHEMA, list_shards, read_shard, shard_metadata, shard_table,
                             validate_table, write_shard)

META = dict(dataset="mnist", mean=0.1307, std=0.3081, seed=7)


def _arrays(n=6, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(0.5, 2.0, (n, 1, 28, 28)).astype(np.float32)  # unclipped noise
    return np.arange(10, 10 + n), rng.integers(0, 10, n), images


def test_write_read_round_trip(tmp_path):
    ids, labels, images = _arrays()
    uri = write_shard(str(tmp_path / "gaussian_noise-s5-00000.parquet"), ids, labels, images,
                      corruption="gaussian_noise", severity=5, **META)
    shard = read_shard(uri)
    assert (shard.name, shard.corruption, shard.severity, len(shard)) == \
        ("gaussian_noise-s5-00000", "gaussian_noise", 5, 6)
    np.testing.assert_array_equal(shard.sample_ids, ids)
    np.testing.assert_array_equal(shard.labels, labels)
    assert shard.images.dtype == np.float32 and shard.images.shape == (6, 1, 28, 28)
    assert np.array_equal(shard.images, images)  # bit-exact, values outside [0, 1] kept
    assert shard.metadata == {"schema_version": 1, "image_shape": [1, 28, 28],
                              "dataset": "mnist", "mean": 0.1307, "std": 0.3081, "seed": 7,
                              "corruption": "gaussian_noise", "severity": 5}
    table = pq.read_table(uri)
    assert [(f.name, f.type) for f in table.schema] == [(f.name, f.type) for f in SCHEMA]
    assert table.column("shard").unique().to_pylist() == ["gaussian_noise-s5-00000"]
    raw = pq.read_schema(uri).metadata
    assert json.loads(raw[b"ttt_pipe.schema_version"]) == 1
    assert os.listdir(tmp_path) == ["gaussian_noise-s5-00000.parquet"]  # no temp file
    assert read_shard(f"file://{uri}").name == shard.name


def test_garbage_and_truncated_files_are_rejected(tmp_path):
    ids, labels, images = _arrays()
    good = write_shard(str(tmp_path / "identity-s0-00000.parquet"), ids, labels, images,
                       corruption="identity", severity=0, **META)
    data = open(good, "rb").read()
    (tmp_path / "trunc.parquet").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.parquet").write_bytes(b"not parquet at all" * 10)
    for name in ("trunc.parquet", "garbage.parquet", "absent.parquet"):
        with pytest.raises(TTTPipeError) as err:
            read_shard(str(tmp_path / name))
        assert "\n" not in str(err.value) and name in str(err.value)


def _table(images=None, n=4, **overrides):
    ids, labels, imgs = _arrays(n)
    meta = shard_metadata(corruption="fog", severity=3, **META)
    meta.update(overrides)
    return shard_table(ids, labels, imgs if images is None else images, name="fog-s3-00000",
                       corruption="fog", severity=3, metadata=meta)


def test_validate_table_accepts_a_good_table():
    assert validate_table(_table(), "x")["corruption"] == "fog"


@pytest.mark.parametrize("case, match", [
    ("nan", "NaN or infinite"), ("inf", "NaN or infinite"), ("empty", "is empty"),
    ("no_meta", "lacks metadata ttt_pipe.dataset"), ("version", "schema version 2"),
    ("columns", "missing columns label"), ("types", "not a ttt-pipe shard"),
    ("mixed", "mixes severity"),
])
def test_validate_table_rejects(case, match, tmp_path):
    table = _table()
    if case in ("nan", "inf"):
        images = _arrays(4)[2]
        images[1, 0, 3, 3] = np.nan if case == "nan" else np.inf
        table = _table(images)
    elif case == "empty":
        table = table.slice(0, 0)
    elif case == "no_meta":
        meta = {k: v for k, v in table.schema.metadata.items() if b"dataset" not in k}
        table = table.replace_schema_metadata(meta)
    elif case == "version":
        table = _table(**{"ttt_pipe.schema_version": "2"})
    elif case == "columns":
        table = table.drop_columns(["label"])
    elif case == "types":
        table = table.set_column(1, "label", pa.array(range(4), pa.int64()))
    elif case == "mixed":
        table = table.set_column(4, "severity", pa.array([3, 3, 2, 3], pa.int8()))
    with pytest.raises(TTTPipeError, match=match) as err:
        validate_table(table, "bad.parquet")
    assert "\n" not in str(err.value)
    # the same table as a file: read_shard rejects it too
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    with pytest.raises(TTTPipeError, match=match):
        read_shard(str(path))


def test_write_shard_refuses_nan(tmp_path):
    ids, labels, images = _arrays()
    images[0, 0, 0, 0] = np.nan
    with pytest.raises(TTTPipeError, match="NaN"):
        write_shard(str(tmp_path / "x-s1-00000.parquet"), ids, labels, images,
                    corruption="x", severity=1, **META)
    assert os.listdir(tmp_path) == []


def test_list_shards(tmp_path):
    ids, labels, images = _arrays()
    for name in ("fog-s3-00001", "fog-s3-00000", "identity-s0-00000"):
        write_shard(str(tmp_path / f"{name}.parquet"), ids, labels, images,
                    corruption=name.split("-")[0], severity=int(name.split("-")[1][1:]), **META)
    (tmp_path / "notes.txt").write_text("x")
    everything = list_shards(str(tmp_path))
    assert [os.path.basename(u) for u in everything] == \
        ["fog-s3-00000.parquet", "fog-s3-00001.parquet", "identity-s0-00000.parquet"]
    assert list_shards(str(tmp_path / "fog-*.parquet")) == everything[:2]
    assert list_shards(everything[2]) == everything[2:]
    with pytest.raises(TTTPipeError, match="no shards found at"):
        list_shards(str(tmp_path / "gauss*"))


def test_plan_shards():
    assert plan_shards("fog,rotate", "5,1") == \
        [("identity", 0), ("fog", 1), ("fog", 5), ("rotate", 1), ("rotate", 5)]
    assert plan_shards("identity", "1,2", identity=False) == [("identity", 0)]
    assert plan_shards("fog", "2", identity=False) == [("fog", 2)]


def test_make_shards_layout_and_contents(idx_dir, tmp_path):
    out = tmp_path / "out"
    seen = []
    summary = make_shards("mnist", str(out), "gaussian_noise,rotate", "1,5",
                          data_dir=idx_dir / "mnist", shard_size=12, limit=30, seed=3,
                          progress=lambda done, total, uri: seen.append((done, total)))
    names = sorted(os.listdir(out))
    assert names == sorted(f"{c}-s{s}-{i:05d}.parquet" for c, s in
                           [("identity", 0), ("gaussian_noise", 1), ("gaussian_noise", 5),
                            ("rotate", 1), ("rotate", 5)] for i in range(3))
    assert summary.rows == 5 * 30 and summary.samples == 30 and len(summary.shards) == 15
    assert seen[-1] == (15, 15) and summary.bytes > 0
    clean = read_shard(str(out / "identity-s0-00000.parquet"))
    noisy = read_shard(str(out / "gaussian_noise-s5-00002.parquet"))
    assert clean.sample_ids.tolist() == list(range(12)) and noisy.sample_ids.tolist() == list(range(24, 30))
    assert clean.images.min() >= 0 and clean.images.max() <= 1
    assert noisy.metadata["seed"] == 3 and noisy.metadata["std"] == 0.3081
    assert noisy.images.min() < 0  # unclipped Gaussian noise kept exactly


def test_make_shards_is_byte_identical(idx_dir, tmp_path):
    runs = []
    for run in ("a", "b"):
        out = tmp_path / run
        make_shards("fashion-mnist", str(out), "gaussian_noise,fog,canny_edges", "3",
                    data_dir=idx_dir / "fashion-mnist", shard_size=20, seed=1)
        runs.append({p: (out / p).read_bytes() for p in sorted(os.listdir(out))})
    assert runs[0].keys() == runs[1].keys() and len(runs[0]) == 8
    assert runs[0] == runs[1]
    # a rerun into the same folder overwrites in place with the same bytes
    make_shards("fashion-mnist", str(tmp_path / "a"), "gaussian_noise,fog,canny_edges", "3",
                data_dir=idx_dir / "fashion-mnist", shard_size=20, seed=1)
    assert {p: (tmp_path / "a" / p).read_bytes() for p in os.listdir(tmp_path / "a")} == runs[0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(corruptions="blurr"), "unknown corruption 'blurr'"),
    (dict(severities="0"), "severity 0 is out of range"),
    (dict(severities="6"), "out of range"),
    (dict(shard_size=0), "shard_size must be a positive integer"),
    (dict(limit=-1), "limit must be a positive integer"),
    (dict(seed=-2), "seed must be a non-negative integer"),
    (dict(dataset="cifar"), "unknown dataset"),
    (dict(data_dir="/nonexistent/dir"), "IDX files not found"),
])
def test_make_shards_validates_before_writing(idx_dir, tmp_path, kwargs, match):
    args = dict(dataset="mnist", out=str(tmp_path / "out"), corruptions="fog",
                severities="1", data_dir=idx_dir / "mnist")
    args.update(kwargs)
    with pytest.raises(TTTPipeError, match=match):
        make_shards(**args)
    assert os.listdir(tmp_path) == []  # not even the folder


def test_failure_midway_removes_what_was_written(idx_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = shard_maker.corrupt
    calls = []

    def flaky(images, name, *args):
        calls.append(name)
        if len(calls) == 4:
            raise TTTPipeError("disk on fire")
        return real(images, name, *args)

    monkeypatch.setattr(shard_maker, "corrupt", flaky)
    with pytest.raises(TTTPipeError, match="disk on fire"):
        make_shards("mnist", str(out), "fog,rotate", "1,2", data_dir=idx_dir / "mnist",
                    shard_size=16)
    assert len(calls) == 4 and not out.exists()
    # NaN from a corruption: rejected before the write, earlier files removed too
    monkeypatch.setattr(shard_maker, "corrupt",
                        lambda x, name, *a: x * np.nan if name == "rotate" else x)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(TTTPipeError, match="NaN"):
        make_shards("mnist", str(out), "fog,rotate", "1", data_dir=idx_dir / "mnist")
    assert os.listdir(out) == ["keep.txt"]


def test_out_with_other_shards_or_unwritable(idx_dir, tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "fog-s1-00009.parquet").write_text("x")
    with pytest.raises(TTTPipeError, match="already holds 1 other shard"):
        make_shards("mnist", str(tmp_path / "old"), "fog", "1", data_dir=idx_dir / "mnist")
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(TTTPipeError) as err:
            make_shards("mnist", str(out), "fog", "1", data_dir=idx_dir / "mnist")
        assert "\n" not in str(err.value)
    assert sorted(os.listdir(tmp_path)) == ["file", "old"]


def test_shared_shard_fixture(shard_dir):
    shards = list_shards(str(shard_dir))
    assert [os.path.basename(u) for u in shards] == [
        "gaussian_noise-s5-00000.parquet", "gaussian_noise-s5-00001.parquet",
        "identity-s0-00000.parquet", "identity-s0-00001.parquet"]
    assert sum(len(read_shard(u)) for u in shards) == 64
