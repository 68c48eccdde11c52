"""The results schema, the accuracy aggregation and reading (partial) results folders."""

from __future__ import annotations

import json
from collections import defaultdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import TTTPipeError
from pipeline.results import (ACCURACY_SCHEMA, PREDICTION_SCHEMA, accuracy_table,
                              predictions_uri, read_results, shard_name)


def make_predictions(shard: str, corruption: str, severity: int, method: str, n: int,
                     steps: int, correct_fn) -> pa.Table:
    """Rows for `n` samples x `steps + 1` steps; `correct_fn(i, step)` says which are right."""
    rows = defaultdict(list)
    for i in range(n):
        for step in range(steps + 1):
            ok = bool(correct_fn(i, step))
            rows["sample_id"].append(i)
            rows["shard"].append(shard)
            rows["corruption"].append(corruption)
            rows["severity"].append(severity)
            rows["method"].append(method)
            rows["step"].append(step)
            rows["label"].append(i % 10)
            rows["pred"].append(i % 10 if ok else (i + 1) % 10)
            rows["correct"].append(ok)
            rows["confidence"].append(0.5)
            rows["batch"].append(i // 4)
            rows["loss"].append(float("nan") if step == steps else 0.1)
    return pa.table(rows, schema=PREDICTION_SCHEMA)


def write_folder(root, tables: dict[str, pa.Table], asked: list[str] | None = None) -> None:
    (root / "predictions").mkdir(parents=True)
    for name, table in tables.items():
        pq.write_table(table, root / "predictions" / f"{name}.parquet")
    if asked is not None:
        run = {"method": "ttt", "steps": 2, "shards": [f"/data/shards/{s}.parquet" for s in asked]}
        (root / "run.json").write_text(json.dumps(run))


def test_accuracy_table_matches_plain_python():
    a = make_predictions("gaussian_noise-s5-00000", "gaussian_noise", 5, "ttt", 20, 2,
                         lambda i, s: i % (3 + s) == 0)
    b = make_predictions("identity-s0-00000", "identity", 0, "ttt", 12, 2, lambda i, s: i < 9)
    pred = pa.concat_tables([a, b])
    acc = accuracy_table(pred)
    assert acc.schema == ACCURACY_SCHEMA
    expected = defaultdict(lambda: [0, 0])
    for r in pred.to_pylist():
        key = (r["method"], r["corruption"], r["severity"], r["step"])
        expected[key][0] += 1
        expected[key][1] += int(r["correct"])
    got = {(r["method"], r["corruption"], r["severity"], r["step"]): r for r in acc.to_pylist()}
    assert set(got) == set(expected)
    for key, (n, c) in expected.items():
        assert got[key]["n"] == n and got[key]["correct"] == c
        assert got[key]["accuracy"] == pytest.approx(c / n)
    # hand-checked numbers: 20 samples, step 0 correct when i % 3 == 0 -> 7/20
    assert got[("ttt", "gaussian_noise", 5, 0)]["correct"] == 7
    assert got[("ttt", "identity", 0, 1)]["accuracy"] == pytest.approx(9 / 12)
    keys = [(r["method"], r["corruption"], r["severity"], r["step"]) for r in acc.to_pylist()]
    assert keys == sorted(keys)


def test_accuracy_table_empty_and_bad_columns():
    assert accuracy_table(PREDICTION_SCHEMA.empty_table()).num_rows == 0
    with pytest.raises(TTTPipeError, match="correct"):
        accuracy_table(pa.table({"method": ["a"], "corruption": ["b"], "severity": [1], "step": [0]}))


def test_names_and_uris():
    assert shard_name("s3://bucket/x/fog-s3-00002.parquet") == "fog-s3-00002"
    assert shard_name("fog-s3-00002") == "fog-s3-00002"
    assert predictions_uri("s3://b/res", "/a/fog-s3-00002.parquet") == "s3://b/res/predictions/fog-s3-00002.parquet"
    assert predictions_uri("/tmp/res/", "fog-s3-00002") == "/tmp/res/predictions/fog-s3-00002.parquet"


def test_read_partial_folder_names_missing_shards(tmp_path):
    done = {"gaussian_noise-s5-00000": make_predictions("gaussian_noise-s5-00000", "gaussian_noise",
                                                        5, "ttt", 8, 1, lambda i, s: s == 1)}
    write_folder(tmp_path / "res", done, asked=["gaussian_noise-s5-00000", "fog-s3-00000", "identity-s0-00000"])
    res = read_results(str(tmp_path / "res"))
    assert res.missing_shards == ["fog-s3-00000", "identity-s0-00000"]
    assert res.done_shards == ["gaussian_noise-s5-00000"]
    assert not res.complete and res.name == "res" and res.methods == ["ttt"]
    assert res.predictions.schema == PREDICTION_SCHEMA and res.predictions.num_rows == 16
    assert res.accuracy.column("accuracy").to_pylist() == [0.0, 1.0]
    assert res.run["steps"] == 2


def test_read_without_run_json_and_ignores_temp_files(tmp_path):
    t = make_predictions("fog-s3-00000", "fog", 3, "it3", 4, 0, lambda i, s: True)
    write_folder(tmp_path / "r", {"fog-s3-00000": t})
    (tmp_path / "r" / "predictions" / ".fog-s3-00001.parquet.tmp").write_bytes(b"partial")
    res = read_results(tmp_path / "r")
    assert res.run == {} and res.missing_shards == [] and res.accuracy.num_rows == 1


def test_read_errors_are_one_line(tmp_path):
    with pytest.raises(TTTPipeError, match="not found") as e:
        read_results(str(tmp_path / "nope"))
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TTTPipeError, match="no predictions"):
        read_results(str(tmp_path / "empty"))
    write_folder(tmp_path / "bad", {})
    (tmp_path / "bad" / "predictions" / "x-s1-00000.parquet").write_bytes(b"not parquet")
    with pytest.raises(TTTPipeError, match="x-s1-00000"):
        read_results(str(tmp_path / "bad"))
    write_folder(tmp_path / "badrun", {"a-s1-00000": make_predictions("a-s1-00000", "a", 1, "ttt", 2, 0,
                                                                       lambda i, s: True)})
    (tmp_path / "badrun" / "run.json").write_text("{oops")
    with pytest.raises(TTTPipeError, match="run.json"):
        read_results(str(tmp_path / "badrun"))
