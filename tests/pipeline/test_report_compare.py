"""Methods side by side: numbers by hand, --error, the baseline rule and its caption, the
red threshold, the cost table, streams, mismatched shards, no oracle step."""

from __future__ import annotations

import csv
import dataclasses
import io
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/report_fixtures.py
import report_fixtures as rf  # noqa: E402

from pipeline.cost import COST_FILE, costs_table  # noqa: E402
from pipeline.errors import TTTPipeError  # noqa: E402
from pipeline.gain import gain_class  # noqa: E402
from pipeline.report import build_report, cost_table, format_table, series_of, side_by_side  # noqa: E402
from pipeline.report.compare import stream_table  # noqa: E402
from pipeline.results import accuracy_table, read_results  # noqa: E402

MIB = 2 ** 20


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """ttt (offset 0), it3 (offset 1), source (offset 2, step 0 only) on the same shards."""
    root = tmp_path_factory.mktemp("compare")
    shards = rf.write_shards(root / "shards")
    ttt = rf.write_results(root / "ttt", shards, "ttt", settings={})
    it3 = rf.write_results(root / "it3", shards, "it3", offset=1, settings={})
    source = rf.write_results(root / "source", shards, "source", offset=2, steps=0, settings={})
    return root, shards, ttt, it3, source


def _rows(table) -> dict:
    return {(r.corruption, r.severity): r for r in table.rows}


def _csv(table) -> dict:
    return {(r["corruption"], r["severity"]): r
            for r in csv.DictReader(io.StringIO(format_table(table, "csv")))}


def test_side_by_side_numbers_by_hand(runs):
    _, _, ttt, it3, source = runs
    table = side_by_side([read_results(str(p)) for p in (ttt, it3, source)])
    assert [e.label for e in table.entries] == ["ttt", "it3", "source"]
    assert [e.step for e in table.entries] == [3, 3, 0]
    assert table.header() == ["corruption", "severity", "ttt acc", "ttt gain", "it3 acc",
                              "it3 gain", "source acc"]
    rows = _csv(table)
    # (i * 7) % 40 is a permutation of 0..39: the count right is the fixture's threshold,
    # 30 - 3 sev + (1 + sev % 4) step + offset: fog s3 ttt step 3 = 21 + 12 = 33 of 40
    hand = {  # (corruption, severity): (ttt @3, it3 @3, source @0), in %
        ("fog", "3"): (82.5, 85.0, 57.5), ("gaussian_noise", "1"): (82.5, 85.0, 72.5),
        ("gaussian_noise", "5"): (52.5, 55.0, 42.5), ("identity", "0"): (90.0, 90.0, 90.0)}
    for key, (t, i, s) in hand.items():
        row = rows[key]
        assert float(row["ttt acc"]) == t and float(row["it3 acc"]) == i and float(row["source acc"]) == s
        assert float(row["ttt gain"]) == pytest.approx(t - s) and float(row["it3 gain"]) == pytest.approx(i - s)
    # a corruption over its severities, a severity over corruptions, the corrupted mean
    assert float(rows[("gaussian_noise", "all")]["ttt acc"]) == pytest.approx((82.5 + 52.5) / 2)
    assert float(rows[("gaussian_noise", "all")]["ttt gain"]) == pytest.approx(10.0)
    assert float(rows[("mean", "5")]["it3 acc"]) == pytest.approx(55.0)
    mean = rows[("mean (corrupted)", "")]
    assert float(mean["ttt acc"]) == pytest.approx((82.5 + 82.5 + 52.5) / 3)
    assert float(mean["source acc"]) == pytest.approx((57.5 + 72.5 + 42.5) / 3)
    assert float(mean["ttt gain"]) == pytest.approx((25 + 10 + 10) / 3)
    assert float(mean["it3 gain"]) == pytest.approx((27.5 + 12.5 + 12.5) / 3)
    caption = table.caption()
    assert caption[0].startswith("ttt: step 3 (configured last step); gain vs source (")
    assert caption[2] == "source: step 0 (configured last step); the unadapted model"


def test_error_rates(runs):
    _, _, ttt, _, source = runs
    table = side_by_side([read_results(str(ttt)), read_results(str(source))], error=True)
    rows = _csv(table)
    assert table.header()[2:] == ["ttt err", "ttt gain", "source err"]
    assert float(rows[("fog", "3")]["ttt err"]) == 17.5 and float(rows[("fog", "3")]["source err"]) == 42.5
    assert float(rows[("fog", "3")]["ttt gain"]) == 25.0  # an error reduction: the same sign
    assert "error in %" in table.caption()[-1]
    summary = build_report([str(ttt), str(source)], error=True, fmt="markdown")
    assert "| ttt err | ttt gain | source err |" in summary.table_text
    assert "Error in %" in Path(summary.html).read_text()


def test_no_source_run_falls_back_to_step0_for_episodic_ttt_only(tmp_path):
    cells = {("fog", 3): [20, 35, 30]}  # step 1 is best; the configured last step is 2
    ttt = side_by_side([read_results(str(rf.write_counted(tmp_path / "ttt", "ttt", cells, 40)))])
    (e,) = ttt.entries
    assert e.baseline.kind == "step0" and e.step == 2
    assert "vs its own step 0 (no source run; episodic ttt" in ttt.caption()[0]
    fog = _rows(ttt)[("fog", "3")]
    assert fog.values == [0.75] and fog.gains == [pytest.approx(0.25)]  # never step 1's 87.5
    for method, mode, why in (("ttt", "online", "online mode"), ("norm", "episodic", "BN statistics"),
                              ("cotta", "episodic", "teacher"), ("tent", "episodic", "not known")):
        folder = rf.write_counted(tmp_path / f"{method}-{mode}", method, cells, 40, mode=mode)
        table = side_by_side([read_results(str(folder))])
        (e,) = table.entries
        assert e.baseline.kind == "none" and why in e.baseline.why
        assert _rows(table)[("fog", "3")].gains == [None]
        assert "not compared" in table.caption()[0]
        assert format_table(table, "csv").splitlines()[1] == f"fog,3,75.000,"


def test_source_on_other_shards_is_not_compared(runs, tmp_path):
    root, shards, ttt, _, source = runs
    fewer = rf.write_results(tmp_path / "fewer" / "source", shards[:3], "source", steps=0)
    smaller = rf.write_results(tmp_path / "smaller" / "source", shards, "source", steps=0, n=32)
    other = rf.write_shards(tmp_path / "seed1", seed=1)  # same names, ids and labels: other noise
    reseeded = rf.write_results(tmp_path / "reseeded" / "source", other, "source", steps=0)
    for folder, why in ((fewer, "other shard names (only ttt has fog-s3-00000)"),
                        (smaller, "other sample counts in"), (reseeded, "differs in its metadata (seed)")):
        table = side_by_side([read_results(str(ttt)), read_results(str(folder))])
        # episodic ttt falls back to its own step 0 (the unadapted model), never that source
        assert table.entries[0].baseline.kind == "step0"
        assert "no source run of the same model on the same shards" in table.entries[0].baseline.why
        assert any(n.startswith("ttt not compared with source") and why in n for n in table.notes), table.notes
    # the right source among several is found, whatever the order
    table = side_by_side([read_results(str(p)) for p in (fewer, ttt, source)])
    assert table.entries[1].baseline.source.results.path == str(source)


def test_gain_threshold():
    assert gain_class(-1.0) == "neutral" and gain_class(-1.0000000000000009) == "neutral"
    assert gain_class(-1.01) == "loss" and gain_class(1.01) == "gain" and gain_class(1.0) == "neutral"
    assert gain_class(None) is None


def _pair(root: Path, source_right: int, ttt_right: int, n: int):
    source = rf.write_counted(root / "source", "source", {("fog", 3): [source_right]}, n)
    ttt = rf.write_counted(root / "ttt", "ttt", {("fog", 3): [source_right, ttt_right]}, n)
    return ttt, source


def _red_pixels(png: Path) -> int:
    with Image.open(png) as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    return int((np.abs(rgb - [0xD7, 0x30, 0x27]).sum(axis=2) < 30).sum())


@pytest.mark.parametrize("source_right, ttt_right, n, loss", [
    (51, 50, 100, False),            # -1.0 point exactly (0.50 - 0.51 in floats): neutral
    (5101, 5000, 10_000, True)])     # -1.01 points: red
def test_red_cells_beyond_minus_one_point(tmp_path, source_right, ttt_right, n, loss):
    ttt, source = _pair(tmp_path, source_right, ttt_right, n)
    summary = build_report([str(ttt), str(source)], out=str(tmp_path / "rep"), fmt="markdown")
    fog = _rows(summary.table)[("fog", "3")]
    assert fog.gains[0] * 100 == pytest.approx(-(source_right - ttt_right) / n * 100)
    cell = summary.table.cells(fog)[3]
    assert cell == (("-1.0!", "loss") if loss else ("-1.0", "neutral"))
    assert ("| -1.0! |" in summary.table_text) is loss
    page = Path(summary.html).read_text()
    assert ("<td class='loss'>-1.0!</td>" in page) is loss
    red = _red_pixels(tmp_path / "rep" / "gain_heatmap.png")
    assert (red > 500) if loss else (red == 0), red


def test_cost_table_by_hand_and_na_for_old_folders(tmp_path):
    cells = {("fog", 3): [40, 50], ("gaussian_noise", 5): [30, 35]}
    new = rf.write_counted(tmp_path / "new", "ttt", cells, 100)
    rf.write_cost(new, "fog-s3-00000", "ttt", 100, 2.0, "n:1", peak=500 * MIB, base=300 * MIB)
    rf.write_cost(new, "gaussian_noise-s5-00000", "ttt", 100, 3.0, "n:2", peak=700 * MIB, base=650 * MIB)
    old = rf.write_counted(tmp_path / "old", "it3", cells, 100)
    table = cost_table(series_of([read_results(str(new)), read_results(str(old))]))
    a, b = table.rows
    assert a.ms_per_sample == pytest.approx(1000 * 5.0 / 200) and a.actors == 2
    assert a.peak_mib == pytest.approx(700) and a.added_mib == pytest.approx(200)
    assert table.cells(a) == ["ttt", "2 / 2", "25.00", "2", "cpu", "700.0", "200.0",
                              "CPU process peak RSS (getrusage ru_maxrss)"]
    assert table.cells(b) == ["it3", "0 / 2", "n/a", "n/a", "n/a", "n/a", "n/a", "n/a"]
    assert any("n/a: it3 recorded no cost" in c for c in table.caption())
    rows = list(csv.DictReader(io.StringIO(table.to_csv())))
    assert rows[0]["ms / sample"] == "25.0000" and rows[1]["ms / sample"] == ""
    # a finished run's cost.parquet is read instead of the sidecars
    pq.write_table(costs_table([{"shard": "fog-s3-00000", "method": "ttt", "samples": 100,
                                 "adapt_s": 1.0, "actor": "n:9", "device": "cuda:0",
                                 "memory": "cuda_max_allocated", "peak_bytes": MIB, "base_bytes": 0}]),
                   new / COST_FILE)
    (row,) = cost_table(series_of([read_results(str(new))])).rows
    assert (row.ms_per_sample, row.devices, row.peak_mib) == (pytest.approx(10.0), "cuda:0", 1.0)
    summary = build_report([str(new), str(old)], fmt="csv", show="cost")
    assert summary.table_text.splitlines()[0].startswith("method,units timed,ms / sample")
    assert "peak MiB / actor" in Path(summary.html).read_text()


def test_streams(runs):
    _, _, ttt, _, source = runs
    a, b = read_results(str(ttt)), read_results(str(rf.write_results(
        Path(str(ttt) + "_b"), read_results(str(ttt)).shard_uris, "ttt", offset=2)))

    def tagged(r, name):
        return r.accuracy.append_column("stream", pa.array([name] * r.accuracy.num_rows, pa.string()))

    both = dataclasses.replace(a, accuracy=pa.concat_tables([tagged(a, "s1"), tagged(b, "s2")]))
    alone = side_by_side([both])
    # episodic ttt: step 0 of every batch is the unadapted model, in a stream too
    assert alone.entries[0].baseline.kind == "step0"
    assert "in streams too" in alone.entries[0].baseline.why
    online = dataclasses.replace(both, run={**both.run, "settings": {**both.run["settings"], "mode": "online"}})
    (entry,) = side_by_side([online]).entries
    assert entry.baseline.kind == "none" and "earlier batches of its stream" in entry.baseline.why
    table = side_by_side([both, read_results(str(source))])
    assert table.header()[:3] == ["stream", "corruption", "severity"]
    per_stream = stream_table(table)
    rows = {r.stream: r for r in per_stream.rows}
    assert rows["s1"].values[0] == pytest.approx((33 + 33 + 21) / 120)
    assert rows["s2"].values[0] == pytest.approx((35 + 35 + 23) / 120)
    assert rows["s2"].gains[0] == pytest.approx((35 + 35 + 23 - 23 - 29 - 17) / 120)  # vs source
    assert stream_table(side_by_side([a])) is None
    with pytest.raises(TTTPipeError, match="no accuracy row has a stream"):
        build_report([str(ttt)], show="streams")


def test_adapt_table_flags_losses(tmp_path):
    from rich.console import Console

    from jobs.commands.adapt import accuracy_rich_table

    def render(right: list[int], n: int) -> str:
        console = Console(file=io.StringIO(), width=120, color_system=None, record=True)
        console.print(accuracy_rich_table(accuracy_table(
            rf.counted_predictions("fog-s3-00000", "fog", 3, "ttt", right, n))))
        return console.export_text()

    text = render([5101, 5000], 10_000)
    assert "-1.0!" in text and "1 row(s) lose more than 1 point" in text
    text = render([51, 50], 100)
    assert "-1.0" in text and "!" not in text and "lose more" not in text
