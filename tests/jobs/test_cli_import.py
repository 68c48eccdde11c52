"""`ttt-pipe import-corrupted` through CliRunner: tiny CIFAR-C and ImageNet-C trees -> shards."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from rgb_helpers import write_cifar_c, write_image
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.datasets import imagenet_wnids
from pipeline.shards import list_shards, read_shard, read_shard_footer

runner = CliRunner()
N = 10  # clean test samples per severity block


def _invoke(*args: str):
    return runner.invoke(app, ["import-corrupted", *args], env={"COLUMNS": "200"})


@pytest.mark.ray
def test_import_cifar_c(ray_local, tmp_path):
    labels, arrays = write_cifar_c(tmp_path / "CIFAR-10-C", N)
    out = tmp_path / "shards"
    result = _invoke("--layout", "cifar-c", "--src", str(tmp_path / "CIFAR-10-C"),
                     "--dataset", "cifar10", "--out", str(out), "--severities", "1,5",
                     "--shard-size", "4", "--seed", "3", "--cpus-per-task", "0.5")
    assert result.exit_code == 0, result.output
    assert "wrote 12 shards" in result.output and "40 rows" in result.output
    names = [os.path.basename(u) for u in list_shards(str(out))]
    assert names == sorted(f"{c}-s{s}-{i:05d}.parquet" for c in ("fog", "gaussian_noise")
                           for s in (1, 5) for i in range(3))
    perm = np.random.default_rng(3).permutation(N)
    for c in ("fog", "gaussian_noise"):
        for s in (1, 5):
            shards = [read_shard(str(out / f"{c}-s{s}-{i:05d}.parquet")) for i in range(3)]
            ids = np.concatenate([sh.sample_ids for sh in shards])
            np.testing.assert_array_equal(ids, perm)  # seeded shuffle, chunked in order
            images = np.concatenate([sh.images for sh in shards])
            block = arrays[c][(s - 1) * N:s * N]
            np.testing.assert_array_equal(images, block[ids].transpose(0, 3, 1, 2))
            np.testing.assert_array_equal(np.concatenate([sh.labels for sh in shards]), labels[ids])
            meta = shards[0].metadata
            assert meta["image_dtype"] == "uint8" and meta["shuffle_seed"] == 3
            assert meta["suite"] == "imagenet-c" and meta["source"].startswith("import:cifar-c")
            assert meta["dataset"] == "cifar10" and len(meta["mean"]) == 3
    footer = read_shard_footer(str(out / "fog-s1-00000.parquet"))
    assert footer.rows == 4 and footer.image_shape == (3, 32, 32)
    assert pq.read_schema(out / "fog-s1-00000.parquet").field("image").type.list_size == 3072


@pytest.mark.ray
def test_import_imagenet_c_with_limit(ray_local, tmp_path):
    wnids = imagenet_wnids()[:3]
    src = tmp_path / "imagenet-c"
    for c, wnid in enumerate(wnids):
        for k in range(2):
            write_image(src / "fog" / "2" / wnid / f"ILSVRC2012_val_{c:04d}{k:04d}.JPEG", (24, 24),
                        seed=10 * c + k)
    out = tmp_path / "shards"
    result = _invoke("--layout", "imagenet-c", "--src", str(src), "--dataset", "imagenet",
                     "--image-size", "24", "--out", str(out), "--severities", "2",
                     "--limit", "4", "--seed", "1")
    assert result.exit_code == 0, result.output
    (uri,) = list_shards(str(out))
    shard = read_shard(uri)
    assert shard.name == "fog-s2-00000" and len(shard) == 4 and shard.images.shape == (4, 3, 24, 24)
    assert set(shard.labels.tolist()) <= {0, 1, 2} and len(set(shard.sample_ids.tolist())) == 4


@pytest.mark.parametrize("case, message", [
    ("layout", "unknown layout 'cifar-x'"),
    ("src", "is not a folder"),
    ("dataset", "unknown dataset"),
    ("shape", "expected uint8 (50, 32, 32, 3)"),
    ("labels", "labels"),
    ("grayscale", "RGB"),
    ("corruption", "fogg"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case, message):
    src = tmp_path / "CIFAR-10-C"
    write_cifar_c(src, N, names=("fog",))
    args = {"--layout": "cifar-c", "--src": str(src), "--dataset": "cifar10",
            "--out": str(tmp_path / "out"), "--corruptions": "fog"}
    if case == "layout":
        args["--layout"] = "cifar-x"
    elif case == "src":
        args["--src"] = str(tmp_path / "missing")
    elif case == "dataset":
        args["--dataset"] = "cifar11"
    elif case == "shape":
        np.save(src / "fog.npy", np.zeros((5 * N, 32, 31, 3), np.uint8))
    elif case == "labels":
        np.save(src / "labels.npy", np.zeros(7, np.uint8))
    elif case == "grayscale":
        args["--dataset"] = "mnist"
    elif case == "corruption":
        args["--corruptions"] = "fogg"
    before = sorted(os.listdir(tmp_path))
    result = _invoke(*[x for pair in args.items() for x in pair])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert sorted(os.listdir(tmp_path)) == before  # no out folder, nothing written
