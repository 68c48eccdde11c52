"""build_report on synthetic results folders: numbers, formats, PNGs, html, partial runs."""

from __future__ import annotations

import base64
import csv
import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/report_fixtures.py
import report_fixtures as rf  # noqa: E402

from pipeline.errors import TTTPipeError  # noqa: E402
from pipeline.report import build_report, comparison_table, format_table  # noqa: E402
from pipeline.results import read_results  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CORRUPTED = [(c, s) for c, s in rf.SHARDS if c != "identity"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return rf.write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def full(tmp_path_factory, shards) -> Path:
    return rf.write_results(tmp_path_factory.mktemp("runs") / "ttt_run", shards, "ttt")


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 10_000, f"{path} is suspiciously small ({len(data)} bytes)"
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        assert w > 300 and h > 150
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 5, f"{path} looks blank"


def test_table_numbers_equal_plain_python(full):
    table = comparison_table([read_results(str(full))])
    header = table.header()
    assert header[:2] == ["corruption", "severity"]
    assert header[2:] == [f"ttt step {k}" for k in range(rf.STEPS + 1)] + ["ttt gain"]
    rows = {(r.corruption, r.severity): r.values for r in table.rows}
    assert list(rows)[0] == ("identity", 0)  # the clean baseline first
    for corruption, severity in rf.SHARDS:
        expected = [rf.expected_accuracy(corruption, severity, k) for k in range(rf.STEPS + 1)]
        got = rows[(corruption, severity)]
        assert got[:-1] == pytest.approx(expected)
        assert got[-1] == pytest.approx(expected[-1] - expected[0])
    # hand-checked: gaussian_noise s5 has 40 samples, step 0 threshold 15 -> 15/40
    assert rows[("gaussian_noise", 5)][0] == pytest.approx(15 / 40)
    mean = rows[("mean (corrupted)", None)]
    for k in range(rf.STEPS + 1):
        assert mean[k] == pytest.approx(
            sum(rf.expected_accuracy(c, s, k) for c, s in CORRUPTED) / len(CORRUPTED))


def test_build_report_writes_pngs_and_self_contained_html(full, tmp_path):
    out = tmp_path / "rep"
    summary = build_report([str(full)], out=str(out), fmt="table")
    names = sorted(Path(f).name for f in summary.files)
    assert names == ["accuracy_vs_steps.png", "batch_accuracy_boxplot.png",
                     "gain_heatmap.png", "index.html", "samples.png"]
    for f in summary.files:
        if f.endswith(".png"):
            check_png(Path(f))
    page = (out / "index.html").read_text()
    embedded = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(embedded) == 4
    for data in embedded:
        assert base64.b64decode(data)[:8] == PNG_MAGIC
    assert not re.search(r"(src|href)=['\"]?(https?:|//|[^'\"d#])", page)  # nothing external
    assert "<script" not in page and "<link" not in page
    assert "<td>82.5</td>" in page and "+15.0" in page  # the table is in the page
    assert summary.missing == {} and "gaussian_noise" in summary.table_text
    assert summary.notes == []


def test_default_out_is_inside_first_results(full):
    summary = build_report(str(full), fmt="csv")
    assert Path(summary.out_dir) == full / "report" and (full / "report" / "index.html").exists()
    assert summary.table_text == format_table(summary.table, "csv")


def test_markdown_and_csv_parse(full):
    table = comparison_table([read_results(str(full))])
    md = format_table(table, "markdown")
    lines = md.strip().splitlines()
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    assert len({len(c) for c in cells}) == 1 and set(lines[1]) <= set("|:-")
    assert cells[0][2] == "ttt step 0" and cells[-1][0] == "**mean (corrupted)**"
    text = format_table(table, "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == len(rf.SHARDS) + 1
    for row in rows[:-1]:
        c, s = row["corruption"], int(row["severity"])
        for k in range(rf.STEPS + 1):
            assert float(row[f"ttt step {k}"]) == pytest.approx(100 * rf.expected_accuracy(c, s, k), abs=1e-3)
        assert float(row["ttt gain"]) == pytest.approx(
            100 * (rf.expected_accuracy(c, s, rf.STEPS) - rf.expected_accuracy(c, s, 0)), abs=1e-3)
    assert rows[-1]["severity"] == ""


def test_partial_folder_names_missing_shards(tmp_path, shards):
    done = {"identity-s0-00000", "fog-s3-00000"}
    res = rf.write_results(tmp_path / "partial", shards, "it3", done=done)
    summary = build_report([str(res)], fmt="markdown")
    assert summary.missing == {str(res): ["gaussian_noise-s1-00000", "gaussian_noise-s5-00000"]}
    assert "gaussian_noise" not in summary.table_text and "fog" in summary.table_text
    page = Path(summary.html).read_text()
    assert "Partial results" in page and "gaussian_noise-s5-00000" in page


def test_two_runs_of_one_method_do_not_merge(tmp_path, shards):
    a = rf.write_results(tmp_path / "run_a", shards, "ttt")
    b = rf.write_results(tmp_path / "run_b", shards, "ttt", offset=2)
    c = rf.write_results(tmp_path / "run_c", shards, "it3", offset=1)
    table = comparison_table([read_results(str(p)) for p in (a, b, c)])
    labels = [s.label for s in table.series]
    assert labels == ["ttt (run_a)", "ttt (run_b)", "it3"]
    header = table.header()
    fog = next(r.values for r in table.rows if r.corruption == "fog")
    for label, offset in (("ttt (run_a)", 0), ("ttt (run_b)", 2), ("it3", 1)):
        i = header.index(f"{label} step 0") - 2
        assert fog[i] == pytest.approx(rf.expected_accuracy("fog", 3, 0, offset=offset))
    # same folder name twice (different parents): still two series
    d = rf.write_results(tmp_path / "other" / "run_a", shards, "ttt")
    labels = [s.label for s in comparison_table([read_results(str(p)) for p in (a, d)]).series]
    assert len(set(labels)) == 2


def test_sample_grid_without_clean_shard_and_with_unreachable_shard(tmp_path, shards):
    asked = [u for u in shards if "identity" not in u] + [str(tmp_path / "gone" / "fog-s5-00000.parquet")]
    res = rf.write_results(tmp_path / "noclean", asked, "ttt",
                           done={Path(u).stem for u in asked[:-1]})
    summary = build_report([str(res)], fmt="table")
    assert any("corrupted inputs only" in n for n in summary.notes)
    assert any("fog-s5-00000" in n and "not reachable" in n for n in summary.notes)
    check_png(Path(summary.out_dir) / "samples.png")  # fog falls back to its severity-3 shard
    with Image.open(Path(summary.out_dir) / "samples.png") as im:
        assert im.size[1] > 300  # three rows: fog s3, gaussian_noise s5 ... not only one
    assert "not reachable" in Path(summary.html).read_text()


def test_no_reachable_shard_means_no_sample_figure(tmp_path, shards):
    res = rf.write_results(tmp_path / "r", shards, "ttt")
    run = (res / "run.json").read_text().replace(str(Path(shards[0]).parent), str(tmp_path / "moved"))
    (res / "run.json").write_text(run)
    summary = build_report([str(res)], fmt="table")
    assert "samples.png" not in {Path(f).name for f in summary.files}
    assert any("none of the run's shards could be read" in n for n in summary.notes)


def test_step_zero_only_results(tmp_path, shards):
    res = rf.write_results(tmp_path / "r0", shards, "ttt", steps=0)
    summary = build_report([str(res)], fmt="csv", show="steps")
    assert summary.table_text.splitlines()[0] == "corruption,severity,ttt step 0"
    # episodic ttt, no source run: its step 0 is the baseline, so a gain of 0 everywhere
    assert format_table(summary.table, "csv").splitlines()[0] == "corruption,severity,ttt acc,ttt gain"
    check_png(Path(summary.out_dir) / "gain_heatmap.png")


def test_errors(tmp_path):
    with pytest.raises(TTTPipeError, match="not found"):
        build_report([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(TTTPipeError, match="no predictions"):
        build_report([str(tmp_path / "empty")])
    with pytest.raises(TTTPipeError, match="format"):
        build_report([str(tmp_path / "empty")], fmt="xlsx")
