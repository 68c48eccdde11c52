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
from pipeline.shards import (list_shards, read_shard, read_shard_footer, shard_metadata,
                             shard_schema, shard_table, to_pixels, validate_table, write_shard)

META = dict(dataset="mnist", mean=0.1307, std=0.3081, seed=7)
TABLE_META = dict(META, image_shape=(1, 28, 28), image_dtype="float32")


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
    assert shard.metadata == {"schema_version": 2, "image_shape": [1, 28, 28],
                              "image_dtype": "float32", "dataset": "mnist", "suite": "mnist-c",
                              "mean": [0.1307], "std": [0.3081], "seed": 7,
                              "corruption": "gaussian_noise", "severity": 5, "labelled": True,
                              "shuffle_seed": None, "source": "corrupt"}
    assert shard.pixels() is shard.images or np.array_equal(shard.pixels(), images)
    table = pq.read_table(uri)
    assert [(f.name, f.type) for f in table.schema] == \
        [(f.name, f.type) for f in shard_schema((1, 28, 28), "float32")]
    assert table.column("shard").unique().to_pylist() == ["gaussian_noise-s5-00000"]
    raw = pq.read_schema(uri).metadata
    assert json.loads(raw[b"ttt_pipe.schema_version"]) == 2
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
    meta = shard_metadata(corruption="fog", severity=3, **TABLE_META)
    meta.update(overrides)
    return shard_table(ids, labels, imgs if images is None else images, name="fog-s3-00000",
                       corruption="fog", severity=3, metadata=meta)


def test_validate_table_accepts_a_good_table():
    assert validate_table(_table(), "x")["corruption"] == "fog"


@pytest.mark.parametrize("case, match", [
    ("nan", "NaN or infinite"), ("inf", "NaN or infinite"), ("empty", "is empty"),
    ("no_meta", "lacks metadata ttt_pipe.dataset"), ("version", "schema version 3"),
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
        table = _table(**{"ttt_pipe.schema_version": "3"})
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
    assert clean.images.dtype == np.uint8 and clean.metadata["image_dtype"] == "uint8"
    assert noisy.images.dtype == np.float32 and noisy.metadata["suite"] == "mnist-c"
    assert noisy.metadata["seed"] == 3 and noisy.metadata["std"] == [0.3081]
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
    real = shard_maker.corrupt_batch
    calls = []

    def flaky(images, name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 4:
            raise TTTPipeError("disk on fire")
        return real(images, name, *args, **kwargs)

    monkeypatch.setattr(shard_maker, "corrupt_batch", flaky)
    with pytest.raises(TTTPipeError, match="disk on fire"):
        make_shards("mnist", str(out), "fog,rotate", "1,2", data_dir=idx_dir / "mnist",
                    shard_size=16)
    assert len(calls) == 4 and not out.exists()
    # NaN from a corruption: rejected before the write, earlier files removed too
    monkeypatch.setattr(shard_maker, "corrupt_batch",
                        lambda x, name, *a, **k: x * np.float32(np.nan) if name == "rotate"
                        else x.astype(np.float32))
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


# --- version 2: dtypes, shapes, unlabelled data, footers; version 1 files --------------------

def _v1_table(n=5, seed=0) -> pa.Table:
    """A shard exactly as schema version 1 (main at 2fc45bf) wrote it."""
    ids, labels, images = _arrays(n, seed)
    schema = pa.schema([("sample_id", pa.int64()), ("label", pa.int16()),
                        ("image", pa.list_(pa.float32(), 784)), ("corruption", pa.string()),
                        ("severity", pa.int8()), ("shard", pa.string())])
    values = {"schema_version": 1, "image_shape": [1, 28, 28], "dataset": "mnist",
              "mean": 0.1307, "std": 0.3081, "seed": 7, "corruption": "fog", "severity": 3}
    meta = {f"ttt_pipe.{k}": json.dumps(v) for k, v in values.items()}
    columns = [pa.array(ids, pa.int64()), pa.array(labels.astype(np.int16)),
               pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), 784),
               pa.array(["fog"] * n), pa.array(np.full(n, 3, np.int8)),
               pa.array(["fog-s3-00000"] * n)]
    return pa.Table.from_arrays(columns, schema=schema.with_metadata(meta))


def test_version_1_files_still_read(tmp_path):
    path = tmp_path / "fog-s3-00000.parquet"
    pq.write_table(_v1_table(), path, compression="zstd")
    shard = read_shard(str(path))
    ids, labels, images = _arrays(5)
    assert shard.images.dtype == np.float32 and np.array_equal(shard.images, images)
    np.testing.assert_array_equal(shard.labels, labels)
    assert shard.metadata["schema_version"] == 1 and shard.metadata["image_dtype"] == "float32"
    assert shard.metadata["mean"] == [0.1307] and shard.metadata["suite"] == "mnist-c"
    footer = read_shard_footer(str(path))
    assert (footer.rows, footer.image_shape, footer.dataset, footer.labelled) == \
        (5, (1, 28, 28), "mnist", True)
    assert (footer.min_id, footer.max_id) == (10, 14)


def test_uint8_rgb_round_trip_keeps_dtype_and_converts_to_pixel_units(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 3, 12, 20), dtype=np.uint8)  # any H x W
    uri = write_shard(str(tmp_path / "snow-s2-00003.parquet"), np.arange(7), np.arange(7) % 3,
                      images, corruption="snow", severity=2, dataset="cifar10",
                      mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), seed=1, suite="imagenet-c")
    shard = read_shard(uri)
    assert shard.images.dtype == np.uint8 and np.array_equal(shard.images, images)
    assert shard.metadata["suite"] == "imagenet-c" and shard.metadata["image_dtype"] == "uint8"
    assert shard.metadata["mean"] == [0.49, 0.48, 0.45]
    px = shard.pixels(2, 5)
    assert px.dtype == np.float32 and np.array_equal(px, images[2:5].astype(np.float32) / np.float32(255))
    assert pq.read_schema(uri).field("image").type == pa.list_(pa.uint8(), 3 * 12 * 20)
    with pytest.raises(TTTPipeError, match="uint8 or float32"):
        to_pixels(images.astype(np.float64))


def test_unlabelled_shards_have_null_labels(tmp_path):
    images = np.zeros((4, 1, 9, 9), np.uint8)
    uri = write_shard(str(tmp_path / "identity-s0-00000.parquet"), np.arange(4), None, images,
                      corruption="identity", severity=0, **META)
    shard = read_shard(uri)
    assert shard.labels is None and not shard.labelled
    assert pq.read_table(uri).column("label").null_count == 4
    assert read_shard_footer(uri).labelled is False
    # a labelled shard with some labels missing is refused
    table = shard_table(np.arange(4), np.zeros(4), images, name="identity-s0-00000",
                        corruption="identity", severity=0,
                        metadata=shard_metadata(corruption="identity", severity=0,
                                                **dict(TABLE_META, image_shape=(1, 9, 9),
                                                       image_dtype="uint8")))
    table = table.set_column(1, "label", pa.array([1, None, 2, 3], pa.int16()))
    bad = tmp_path / "bad.parquet"
    pq.write_table(table, bad)
    for reader in (read_shard, read_shard_footer):
        with pytest.raises(TTTPipeError, match="1 missing labels of 4"):
            reader(str(bad))


def test_footer_reads_no_pixels_and_checks_what_the_footer_shows(tmp_path):
    ids, labels, images = _arrays(6)
    uri = write_shard(str(tmp_path / "fog-s3-00000.parquet"), ids, labels, images,
                      corruption="fog", severity=3, **META)
    footer = read_shard_footer(uri)
    assert (footer.name, footer.rows, footer.corruption, footer.severity) == ("fog-s3-00000", 6, "fog", 3)
    assert (footer.min_id, footer.max_id) == (10, 15)
    assert footer.metadata == read_shard(uri).metadata
    # NaN pixels are a content check: the footer accepts, read_shard refuses
    images[2, 0, 1, 1] = np.nan
    table = shard_table(ids, labels, images, name="fog-s3-00000", corruption="fog", severity=3,
                        metadata=shard_metadata(corruption="fog", severity=3, **TABLE_META))
    nan = tmp_path / "nan" / "fog-s3-00000.parquet"
    nan.parent.mkdir()
    pq.write_table(table, nan)
    assert read_shard_footer(str(nan)).rows == 6
    with pytest.raises(TTTPipeError, match="1 NaN"):
        read_shard(str(nan))
    # mixed severities show in the statistics
    mixed = table.set_column(4, "severity", pa.array([3, 3, 2, 3, 3, 3], pa.int8()))
    pq.write_table(mixed, nan)
    with pytest.raises(TTTPipeError, match="mixes severity"):
        read_shard_footer(str(nan))
    for name, data in (("trunc.parquet", open(uri, "rb").read()[:100]), ("junk.parquet", b"x" * 50)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TTTPipeError, match="not a valid Parquet file") as err:
            read_shard_footer(str(tmp_path / name))
        assert name in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(TTTPipeError, match="no such shard"):
        read_shard_footer(str(tmp_path / "absent.parquet"))


def test_metadata_must_match_the_image_column(tmp_path):
    ids, labels, images = _arrays(3)
    table = shard_table(ids, labels, images, name="fog-s3-00000", corruption="fog", severity=3,
                        metadata=shard_metadata(corruption="fog", severity=3,
                                                **dict(TABLE_META, image_shape=(3, 28, 28))))
    with pytest.raises(TTTPipeError, match="do not match its metadata"):
        validate_table(table, "x.parquet")


def test_uint8_224_shard_is_about_its_payload_size(tmp_path):
    """Stored uint8 (dictionary-encoded, one byte per pixel before zstd): natural-looking
    224x224x3 images cost about their payload, not 4x (float32)."""
    rng = np.random.default_rng(0)
    n = 8
    # smooth gradients plus noise: compressible like photos, not like constant images
    yy, xx = np.mgrid[0:224, 0:224]
    base = (np.stack([xx, yy, (xx + yy) // 2]) % 256).astype(np.int16)
    images = np.clip(base[None] + rng.integers(-40, 41, (n, 3, 224, 224)), 0, 255).astype(np.uint8)
    uri = write_shard(str(tmp_path / "identity-s0-00000.parquet"), np.arange(n), np.zeros(n, int),
                      images, corruption="identity", severity=0, dataset="imagenet",
                      mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), seed=0)
    payload = images.nbytes
    size = os.path.getsize(uri)
    assert size < 1.1 * payload, (size, payload)
    # and incompressible noise: still about one byte per pixel
    noise = rng.integers(0, 256, (n, 3, 224, 224), dtype=np.uint8)
    uri = write_shard(str(tmp_path / "gaussian_noise-s5-00000.parquet"), np.arange(n),
                      np.zeros(n, int), noise, corruption="gaussian_noise", severity=5,
                      dataset="imagenet", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                      seed=0)
    assert os.path.getsize(uri) < 1.1 * noise.nbytes, (os.path.getsize(uri), noise.nbytes)


def test_make_shards_of_an_image_folder_rgb(tmp_path):
    """An ImageFolder tree at --image-size 32: the imagenet-c suite, uint8 shards, the folder's
    identity (name + class-list hash) in the metadata, labels from the class folders."""
    from rgb_helpers import write_folder

    from pipeline.datasets import get_dataset

    root = write_folder(tmp_path / "pets", classes=("cat", "dog"), per_class=(3, 2))
    spec = get_dataset(f"folder:{root}", image_size=32)
    summary = make_shards(f"folder:{root}", str(tmp_path / "out"), "contrast,gaussian_noise", "2",
                          shard_size=3, image_size=32, seed=1)
    assert summary.suite == "imagenet-c" and summary.samples == 5 and len(summary.shards) == 6
    shard = read_shard(str(tmp_path / "out" / "contrast-s2-00001.parquet"))
    assert shard.images.dtype == np.uint8 and shard.images.shape == (2, 3, 32, 32)
    assert shard.metadata["dataset"] == spec.name and spec.name.startswith("folder:pets-")
    assert shard.metadata["suite"] == "imagenet-c" and len(shard.metadata["std"]) == 3
    clean = np.concatenate([read_shard(str(tmp_path / "out" / f"identity-s0-0000{i}.parquet")).labels
                            for i in range(2)])
    assert sorted(clean.tolist()) == [0, 0, 0, 1, 1]
    with pytest.raises(TTTPipeError, match="needs RGB|grayscale"):
        make_shards("mnist", str(tmp_path / "bad"), "jpeg_compression", "1")
    assert not (tmp_path / "bad").exists()


def test_make_shards_of_an_unlabelled_folder(tmp_path):
    """A test split without class folders (deployment data): shards with a null label."""
    from rgb_helpers import write_folder, write_image

    root = write_folder(tmp_path / "pets", classes=("cat", "dog"), per_class=(2, 2),
                        splits=("train",))
    for k in range(3):
        write_image(root / "val" / f"frame_{k}.jpg", (40, 30), seed=k)
    summary = make_shards(f"folder:{root}", str(tmp_path / "out"), "contrast", "1",
                          image_size=32)
    assert summary.samples == 3
    for uri in summary.shards:
        shard = read_shard(uri)
        assert shard.labels is None and shard.metadata["labelled"] is False
        assert read_shard_footer(uri).labelled is False
