"""`ttt-pipe run` with the model options `train` has (--model-kwargs, --normalize, --trust-model)
and --image-size, on a tiny JPEG ImageFolder the test writes: train, shards and adaptation all
use the size; the options reach the checkpoint; bad values are one line and write nothing."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from rgb_helpers import write_folder
from typer.testing import CliRunner

from jobs.cli import app

pytestmark = pytest.mark.ray


def _run(folder, out, *extra: str):
    args = ["run", "--dataset", f"folder:{folder}", "--out", str(out),
            "--corruptions", "gaussian_noise", "--severities", "5", "--limit", "6",
            "--steps", "1", "--epochs", "1", "--actors", "1", *extra]
    return CliRunner().invoke(app, args, env={"COLUMNS": "200"})


def test_run_image_size_and_model_options_on_a_jpeg_folder(ray_local, tmp_path):
    folder = write_folder(tmp_path / "pets", per_class=(4, 3), size=(50, 40))
    out = tmp_path / "demo"
    result = _run(folder, out, "--image-size", "32", "--normalize", "0.5,0.25",
                  "--model-kwargs", '{"in_channels": 3}')
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "checkpoints" / "ttt" / "manifest.json").read_text())
    assert manifest["dataset"]["image_shape"] == [3, 32, 32]
    assert manifest["model"]["name"] == "seed_cnn"  # the seed net: images up to 64 px
    kwargs = manifest["model"]["kwargs"]
    assert kwargs["image_size"] == [32, 32] and kwargs["mean"] == 0.5 and kwargs["std"] == 0.25
    shard = out / "shards" / "gaussian_noise-s5-00000.parquet"
    meta = pq.read_schema(shard).metadata
    assert json.loads(meta[b"ttt_pipe.image_shape"]) == [3, 32, 32]
    acc = pq.read_table(out / "results" / "ttt" / "accuracy.parquet").to_pylist()
    assert {(r["corruption"], r["step"]) for r in acc} >= {("gaussian_noise", 0), ("gaussian_noise", 1)}
    assert all(r["n"] == 6 for r in acc if r["corruption"] == "gaussian_noise")  # --limit 6 of val/'s 7
    # a rerun reuses the checkpoint trained with these options ...
    again = _run(folder, out, "--image-size", "32", "--normalize", "0.5,0.25",
                 "--model-kwargs", '{"in_channels": 3}')
    assert again.exit_code == 0 and "reusing" in again.output, again.output
    # ... and refuses it for other ones (never overwrites a checkpoint)
    other = _run(folder, out, "--image-size", "32")
    assert other.exit_code == 1 and "trained differently" in other.output, other.output


@pytest.mark.parametrize("extra, words", [
    (("--model-kwargs", '{"bogus": 1}'), "bogus"),
    (("--normalize", "sideways"), "normalize"),
    (("--trust-model", "not a module"), "--trust-model"),
    (("--image-size", "4"), "--image-size"),
])
def test_run_bad_model_options_are_one_line_and_write_nothing(tmp_path, extra, words):
    folder = write_folder(tmp_path / "pets", per_class=(2, 2), size=(20, 20))
    out = tmp_path / "demo"
    result = _run(folder, out, *extra)
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], result.output
    assert not out.exists()


def test_image_size_on_a_fixed_size_dataset_is_refused(idx_dir, tmp_path):
    result = CliRunner().invoke(app, ["train", "--method", "ttt", "--dataset", "mnist", "--data-dir",
                                      str(idx_dir / "mnist"), "--out", str(tmp_path / "c"),
                                      "--image-size", "32"])
    assert result.exit_code == 1 and "--image-size only applies" in result.output, result.output
    assert not (tmp_path / "c").exists()
