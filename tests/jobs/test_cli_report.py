"""`ttt-pipe report` through the real CLI (CliRunner): formats, partial runs, errors."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/report_fixtures.py
import report_fixtures as rf  # noqa: E402

from jobs.cli import app  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_report")
    shards = rf.write_shards(root / "shards")
    full = rf.write_results(root / "ttt_run", shards, "ttt")
    partial = rf.write_results(root / "it3_run", shards, "it3", offset=1,
                               done={"identity-s0-00000", "gaussian_noise-s1-00000"})
    return root, full, partial


def test_help():
    result = runner.invoke(app, ["report", "--help"])
    assert result.exit_code == 0
    assert "--format" in result.output and "markdown" in result.output


def test_default_table(folders):
    root, full, _ = folders
    result = runner.invoke(app, ["report", str(full), "--out", str(root / "rep_table")])
    assert result.exit_code == 0, result.output
    assert "mean (corrupted)" in result.stdout and "gaussian_noise" in result.stdout
    assert "82.5" in result.stdout  # fog s3 at step 3: 33/40
    assert str(root / "rep_table" / "index.html") in result.stderr
    assert (root / "rep_table" / "samples.png").stat().st_size > 10_000


def test_csv_is_clean_on_stdout_and_compares_runs(folders):
    root, full, partial = folders
    result = runner.invoke(app, ["report", str(full), str(partial), "-f", "csv", "-t", "steps",
                                 "-o", str(root / "rep_csv")])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))  # stdout holds the csv only
    assert list(rows[0])[:3] == ["corruption", "severity", "ttt step 0"]
    by_key = {(r["corruption"], r["severity"]): r for r in rows}
    assert float(by_key[("fog", "3")]["ttt step 3"]) == pytest.approx(100 * rf.expected_accuracy("fog", 3, 3))
    assert by_key[("fog", "3")]["it3 step 0"] == ""  # it3 has not done fog yet
    assert float(by_key[("gaussian_noise", "1")]["it3 gain"]) == pytest.approx(
        100 * (rf.expected_accuracy("gaussian_noise", 1, 3, 1) - rf.expected_accuracy("gaussian_noise", 1, 0, 1)))
    # the partial run says which shards it lacks, on stderr
    assert "partial results" in result.stderr
    assert "fog-s3-00000" in result.stderr and "gaussian_noise-s5-00000" in result.stderr


def test_markdown(folders):
    root, _, partial = folders
    result = runner.invoke(app, ["report", str(partial), "--format", "markdown", "--table", "steps",
                                 "--out", str(root / "rep_md")])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("| corruption | severity | it3 step 0")
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    assert "fog-s3-00000" in (root / "rep_md" / "index.html").read_text()


@pytest.mark.parametrize("setup", ["missing", "empty"])
def test_errors_are_one_line(tmp_path, setup):
    target = tmp_path / "results"
    if setup == "empty":
        (target / "predictions").mkdir(parents=True)
    result = runner.invoke(app, ["report", str(target)])
    assert result.exit_code == 1
    err = result.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
    assert ("not found" if setup == "missing" else "no predictions") in err


def test_bad_format_is_rejected(folders):
    _, full, _ = folders
    result = runner.invoke(app, ["report", str(full), "--format", "xlsx"])
    assert result.exit_code == 2


def test_console_table_never_truncates_numbers(folders):
    root, full, partial = folders
    result = runner.invoke(app, ["report", str(full), str(partial), "-t", "steps",
                                 "-o", str(root / "rep_two")])
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout  # CliRunner's console is 80 columns wide
    assert "A = ttt" in result.stdout and "B = it3" in result.stdout
    assert "intermediate steps left out" in result.stdout
    assert "+30.0" in result.stdout  # fog s3 gain of ttt: 33/40 - 21/40


def test_compare_error_and_cost_tables(folders):
    root, full, partial = folders
    result = runner.invoke(app, ["report", str(full), str(partial), "-o", str(root / "rep_cmp")])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "side by side" in out and "Cost per method" in out and "n/a" in out
    assert "A = ttt: step 3 (configured last step); gain vs its own step 0 (no source run" in out
    assert "+30.0" in out  # fog s3 ttt: 33/40 at step 3 vs 21/40 at step 0
    result = runner.invoke(app, ["report", str(full), "--error", "-f", "csv", "-o", str(root / "rep_err")])
    assert result.exit_code == 0, result.output
    rows = {(r["corruption"], r["severity"]): r for r in csv.DictReader(io.StringIO(result.stdout))}
    assert float(rows[("fog", "3")]["ttt err"]) == pytest.approx(17.5)
    assert float(rows[("fog", "3")]["ttt gain"]) == pytest.approx(30.0)
    result = runner.invoke(app, ["report", str(full), "-t", "cost", "-f", "markdown", "-o", str(root / "rep_cost")])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("| method | units timed | ms / sample |") and "| n/a |" in result.stdout
    result = runner.invoke(app, ["report", str(full), "-t", "streams", "-o", str(root / "rep_st")])
    assert result.exit_code == 1 and "no accuracy row has a stream" in result.stderr
