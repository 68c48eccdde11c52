"""`ttt-pipe run` end to end on the shared local Ray and tiny synthetic IDX data: every stage's
output exists, a rerun resumes (checkpoint reused, same accuracies), a foreign checkpoint is
never overwritten, and bad arguments fail before any stage starts."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from jobs.cli import app

pytestmark = pytest.mark.ray


def _run(idx_dir, out, *extra: str):
    args = ["run", "--dataset", "mnist", "--data-dir", str(idx_dir / "mnist"), "--out", str(out),
            "--corruptions", "gaussian_noise,glass_blur", "--severities", "5", "--limit", "32",
            "--steps", "2", "--actors", "1", *extra]
    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def demo(ray_local, idx_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "demo"
    result = _run(idx_dir, out)
    assert result.exit_code == 0, result.output
    return out, result


def test_run_writes_every_stage(demo):
    out, result = demo
    assert (out / "checkpoints" / "ttt" / "manifest.json").is_file()
    shards = sorted(p.name for p in (out / "shards").glob("*.parquet"))
    assert shards == ["gaussian_noise-s5-00000.parquet", "glass_blur-s5-00000.parquet",
                      "identity-s0-00000.parquet"]
    acc = pq.read_table(out / "results" / "ttt" / "accuracy.parquet").to_pylist()
    # 3 shards x steps 0..2, 32 samples each
    assert sorted({(r["corruption"], r["step"]) for r in acc}) == sorted(
        (c, s) for c in ("gaussian_noise", "glass_blur", "identity") for s in range(3))
    assert all(r["n"] == 32 for r in acc)
    assert (out / "report" / "index.html").is_file()
    assert "mean (corrupted)" in result.output and "index.html" in result.output


def test_rerun_resumes_with_identical_results(demo, idx_dir):
    out, _ = demo
    before = pq.read_table(out / "results" / "ttt" / "accuracy.parquet")
    result = _run(idx_dir, out)
    assert result.exit_code == 0, result.output
    assert "reusing" in result.output
    assert pq.read_table(out / "results" / "ttt" / "accuracy.parquet").equals(before)


def test_a_checkpoint_from_before_a_new_config_field_is_reused(demo, idx_dir):
    out, _ = demo
    path = out / "checkpoints" / "ttt" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["method"]["config"]["split_model"]   # written before the field existed
    path.write_text(json.dumps(manifest))
    result = _run(idx_dir, out)
    assert result.exit_code == 0, result.output
    assert "reusing" in result.output


def test_a_differently_trained_checkpoint_is_not_overwritten(demo, idx_dir):
    out, _ = demo
    manifest = (out / "checkpoints" / "ttt" / "manifest.json").read_bytes()
    result = _run(idx_dir, out, "--epochs", "3")
    assert result.exit_code == 1
    assert "trained differently" in result.output and "epochs" in result.output
    assert (out / "checkpoints" / "ttt" / "manifest.json").read_bytes() == manifest


@pytest.mark.parametrize("extra, needle", [
    (("--corruptions", "blurr"), "unknown corruption"),
    (("--severities", "7"), "severit"),
    (("--method", "bogus"), "unknown method 'bogus'"),
    (("--actors", "3:1"), "MIN:MAX"),
])
def test_bad_arguments_fail_before_any_stage(idx_dir, tmp_path, extra, needle):
    result = _run(idx_dir, tmp_path / "out", *extra)
    assert result.exit_code != 0
    assert needle in result.output
    assert not (tmp_path / "out").exists()
