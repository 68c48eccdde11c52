"""`ttt-pipe run --dataset cifar10` end to end on tiny CIFAR-format files the test writes
(seed_cnn with in_channels=3 at 32x32, the imagenet-c suite, uint8 shards, RGB sample grid),
and bad RGB input: one line, exit code, nothing written."""

from __future__ import annotations

import json
import pickle

import pyarrow.parquet as pq
import pytest
from rgb_helpers import write_cifar_binary, write_cifar_python
from typer.testing import CliRunner

from jobs.cli import app

pytestmark = pytest.mark.ray


def _run(data_dir, out, *extra: str):
    args = ["run", "--dataset", "cifar10", "--data-dir", str(data_dir), "--out", str(out),
            "--corruptions", "gaussian_noise,contrast", "--severities", "5", "--limit", "12",
            "--steps", "1", "--epochs", "1", "--actors", "1", *extra]
    return CliRunner().invoke(app, args, env={"COLUMNS": "200"})


def test_run_cifar10_end_to_end(ray_local, tmp_path):
    write_cifar_binary(tmp_path / "data", n_train=40, n_test=12)
    out = tmp_path / "demo"
    result = _run(tmp_path / "data", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "checkpoints" / "ttt" / "manifest.json").read_text())
    assert manifest["model"]["name"] == "seed_cnn"
    assert manifest["model"]["kwargs"]["in_channels"] == 3
    assert manifest["dataset"]["image_shape"] == [3, 32, 32]
    shards = sorted(p.name for p in (out / "shards").glob("*.parquet"))
    assert shards == ["contrast-s5-00000.parquet", "gaussian_noise-s5-00000.parquet",
                      "identity-s0-00000.parquet"]
    meta = pq.read_schema(out / "shards" / "contrast-s5-00000.parquet").metadata
    assert json.loads(meta[b"ttt_pipe.suite"]) == "imagenet-c"
    assert json.loads(meta[b"ttt_pipe.image_dtype"]) == "uint8"
    acc = pq.read_table(out / "results" / "ttt" / "accuracy.parquet").to_pylist()
    assert sorted({(r["corruption"], r["step"]) for r in acc}) == sorted(
        (c, s) for c in ("contrast", "gaussian_noise", "identity") for s in range(2))
    assert all(r["n"] == 12 and r["accuracy"] is not None for r in acc)
    assert (out / "report" / "samples.png").is_file() and (out / "report" / "index.html").is_file()


def _bad_pickle(root):
    folder = write_cifar_python(root, n_train=10, n_test=4)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": Evil(), "labels": [0]}, f)


@pytest.mark.parametrize("case, needle", [
    ("pickle", "test_batch"),
    ("grayscale_corruption", "needs RGB"),
    ("rgb_name_on_rgb", "mnist-c (grayscale) corruption"),
    ("empty_folder", "no images"),
])
def test_bad_rgb_input_is_one_line_and_writes_nothing(tmp_path, idx_dir, case, needle):
    out = tmp_path / "out"
    if case == "pickle":
        _bad_pickle(tmp_path / "data")
        result = _run(tmp_path / "data", out)
    elif case == "grayscale_corruption":
        result = CliRunner().invoke(app, ["run", "--dataset", "mnist", "--data-dir",
                                          str(idx_dir / "mnist"), "--out", str(out),
                                          "--corruptions", "jpeg_compression"])
    elif case == "rgb_name_on_rgb":
        write_cifar_binary(tmp_path / "data", n_train=10, n_test=4)
        result = _run(tmp_path / "data", out, "--corruptions", "zigzag")
    else:
        (tmp_path / "pets" / "train" / "cat").mkdir(parents=True)
        (tmp_path / "pets" / "val" / "cat").mkdir(parents=True)
        result = CliRunner().invoke(app, ["run", "--dataset", f"folder:{tmp_path / 'pets'}",
                                          "--out", str(out)])
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], result.output
    assert "Traceback" not in result.output
    assert not out.exists()
