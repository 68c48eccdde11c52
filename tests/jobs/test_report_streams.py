"""`ttt-pipe report` of a real stream run (`adapt --stream continual` on a local Ray): the
`stream` column is kept (`--table streams`), and the cost table counts streams, the unit of
work (one cost record per stream, not per shard)."""

from __future__ import annotations

import csv
import io

import pytest
from adapt_fixtures import ttt_checkpoint  # noqa: F401 (fixture)
from typer.testing import CliRunner

from jobs.adapt import AdaptRequest, run_adapt
from jobs.cli import app
from pipeline.report.costs import cost_table
from pipeline.report.table import Series
from pipeline.results import read_results

runner = CliRunner()
STREAMS = ["continual-s0", "continual-s1", "continual-s5"]  # identity, 2 noises each at 1 and 5


@pytest.fixture(scope="module")
def stream_run(ray_local, ttt_checkpoint, idx_dir, tmp_path_factory):  # noqa: F811
    from pipeline.shard_maker import make_shards

    root = tmp_path_factory.mktemp("report-streams")
    make_shards("mnist", str(root / "shards"), "gaussian_noise,shot_noise", "1,5",
                data_dir=idx_dir / "mnist", shard_size=16, limit=16, seed=0)
    out = root / "results"
    run_adapt(AdaptRequest(ttt_checkpoint, str(root / "shards"), str(out), steps=1, actors=1,
                           stream="continual"))
    return root, out


def test_streams_table_of_a_real_stream_run(stream_run):
    root, out = stream_run
    results = read_results(str(out))
    assert "stream" in results.accuracy.column_names
    assert sorted(set(results.accuracy.column("stream").to_pylist())) == STREAMS
    result = runner.invoke(app, ["report", str(out), "-t", "streams", "-f", "csv", "-o", str(root / "rep")])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert {r["stream"] for r in rows} >= set(STREAMS), rows


def test_cost_table_counts_streams(stream_run):
    root, out = stream_run
    results = read_results(str(out))
    assert sorted(results.done_units) == STREAMS
    assert len(results.done_shards) == 5  # two shards per noisy stream
    (row,) = cost_table([Series("ttt", "ttt", results)]).rows
    assert (row.shards, row.done) == (3, 3) and row.ms_per_sample is not None
    (out / "cost.parquet").unlink()  # a partial run: the sidecars, one per stream
    (row,) = cost_table([Series("ttt", "ttt", read_results(str(out)))]).rows
    assert (row.shards, row.done) == (3, 3)
    result = runner.invoke(app, ["report", str(out), "-t", "cost", "-f", "csv", "-o", str(root / "rc")])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1].startswith("ttt,3 / 3,")
