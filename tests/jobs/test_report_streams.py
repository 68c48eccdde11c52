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


def test_plots_and_html_of_a_real_stream_run(stream_run):
    """The default report of a stream folder alone: console table with the per-stream section,
    every plot a real PNG and index.html with the streams table and all figures; no gain heatmap
    (an online stream run has no baseline of its own), and the table says why."""
    root, out = stream_run
    rep = root / "rep-html"
    result = runner.invoke(app, ["report", str(out), "-o", str(rep)])
    assert result.exit_code == 0, result.output
    assert all(s in result.stdout for s in STREAMS) and "no source run" in result.stdout
    pngs = ["accuracy_vs_steps.png", "batch_accuracy_boxplot.png", "samples.png"]
    for name in pngs:
        assert (rep / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not (rep / "gain_heatmap.png").exists()
    page = (rep / "index.html").read_text()
    assert all(s in page for s in STREAMS)
    assert page.count("data:image/png;base64,") == len(pngs)


def test_stream_run_beside_its_source_run_gets_gains_and_a_heatmap(stream_run, ttt_checkpoint):  # noqa: F811
    """With a `source` run of the same model on the same shards, the stream's rows get gains
    (per stream too) and the report draws the gain heatmap."""
    root, out = stream_run
    src = root / "source"
    run_adapt(AdaptRequest(ttt_checkpoint, str(root / "shards"), str(src), steps=1, actors=1,
                           method="source"))
    rep = root / "rep-gain"
    result = runner.invoke(app, ["report", str(src), str(out), "-t", "streams", "-f", "csv", "-o", str(rep)])
    assert result.exit_code == 0, result.output
    rows = [r for r in csv.DictReader(io.StringIO(result.stdout)) if r["stream"] in STREAMS]
    assert {r["stream"] for r in rows} == set(STREAMS), result.stdout
    gains = [v for r in rows for k, v in r.items() if "gain" in k and v not in ("", "-")]
    assert gains, result.stdout
    assert (rep / "gain_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert (rep / "index.html").read_text().count("data:image/png;base64,") == 4
