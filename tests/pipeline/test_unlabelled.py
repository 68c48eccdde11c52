"""Unlabelled data end to end below Ray: shards with a null label -> predictions with null
label/correct -> accuracy left out -> the report says so; RGB shards in the sample grid."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image
from report_fixtures import write_results, write_shards

from pipeline.report import build_report
from pipeline.report.samples import sample_grid
from pipeline.results import PREDICTION_SCHEMA, accuracy_table, read_results
from pipeline.shards import read_shard, write_shard


def _unlabelled_predictions(table: pa.Table) -> pa.Table:
    n = table.num_rows
    return table.set_column(table.schema.get_field_index("label"), "label", pa.nulls(n, pa.int16())) \
        .set_column(table.schema.get_field_index("correct"), "correct", pa.nulls(n, pa.bool_()))


def test_accuracy_is_null_without_labels_and_over_labelled_rows_when_mixed(tmp_path):
    shards = write_shards(tmp_path / "shards")
    labelled = read_results(write_results(tmp_path / "a", shards)).predictions
    none = _unlabelled_predictions(labelled)
    acc = accuracy_table(none)
    assert acc.column("correct").null_count == acc.num_rows == acc.column("accuracy").null_count
    assert pc.sum(acc.column("n")).as_py() == none.num_rows
    mixed = accuracy_table(pa.concat_tables([labelled, none.set_column(
        none.schema.get_field_index("method"), "method", labelled.column("method"))]))
    ref = accuracy_table(labelled)
    assert mixed.column("accuracy").to_pylist() == ref.column("accuracy").to_pylist()
    assert mixed.column("n").to_pylist() == [2 * v for v in ref.column("n").to_pylist()]


def test_report_says_no_labels_and_keeps_the_labelled_run(tmp_path):
    shards = write_shards(tmp_path / "shards")
    a = write_results(tmp_path / "labelled", shards, method="ttt")
    b = write_results(tmp_path / "deploy", shards, method="it3")
    for path in (b / "predictions").glob("*.parquet"):
        pq.write_table(_unlabelled_predictions(pq.read_table(path)), path)
    (b / "accuracy.parquet").unlink()
    assert read_results(str(b)).labelled is False and read_results(str(a)).labelled
    summary = build_report([str(a), str(b)], out=str(tmp_path / "report"))
    assert any("no labels" in n and "deploy" in n for n in summary.notes)
    assert [s.label for s in summary.table.series] == ["ttt"]
    page = Path(summary.html).read_text()
    assert "no labels" in page
    only = build_report([str(b)], out=str(tmp_path / "report_b"))
    assert any("no labels" in n for n in only.notes) and only.table.series == []
    assert {Path(f).name for f in only.files} == {"samples.png", "index.html"}


def test_worker_writes_null_label_and_correct_for_unlabelled_shards(tmp_path):
    from jobs.shard_worker import AdaptSettings, predict_shard

    class Tiny(torch.nn.Module):  # stands in for an engine: adapt() -> logits per step
        def adapt(self, x, steps, lr, mode):
            logits = x.flatten(1)[:, :4].repeat(steps + 1, 1, 1)
            return type("R", (), {"logits": logits, "losses": torch.zeros(steps)})()

    images = np.random.default_rng(0).integers(0, 256, (5, 3, 4, 6), dtype=np.uint8)
    uri = write_shard(str(tmp_path / "identity-s0-00000.parquet"), np.arange(5), None, images,
                      corruption="identity", severity=0, dataset="folder:x-12345678",
                      mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), seed=0)
    settings = AdaptSettings(method="ttt", weights_sha256="x", steps=1, lr=0.1, batch_size=2)
    table = predict_shard(Tiny(), read_shard(uri), settings)
    assert table.schema.equals(PREDICTION_SCHEMA)
    assert table.column("label").null_count == table.column("correct").null_count == 10
    # pixel units reached the model: argmax over the first 4 pixels of uint8/255
    expected = (images.reshape(5, -1)[:, :4].astype(np.float32) / 255).argmax(1)
    step0 = [p for p, s in zip(table.column("pred").to_pylist(), table.column("step").to_pylist())
             if s == 0]
    assert step0 == expected.tolist()


def test_sample_grid_shows_rgb(tmp_path):
    n = 6
    red = np.zeros((n, 3, 10, 14), np.uint8)
    red[:, 0] = 255  # pure red images
    uris = []
    for corruption, severity, x in (("identity", 0, red), ("contrast", 3, red // 2)):
        uri = str(tmp_path / f"{corruption}-s{severity}-00000.parquet")
        write_shard(uri, np.arange(n), np.arange(n) % 3, x, corruption=corruption,
                    severity=severity, dataset="cifar10", mean=(0.5,) * 3, std=(0.25,) * 3, seed=0)
        uris.append(uri)
    grid = sample_grid(uris, per_row=4)
    assert grid.png is not None and grid.notes == []
    with Image.open(io.BytesIO(grid.png)) as im:
        rgb = np.asarray(im.convert("RGB")).reshape(-1, 3).astype(int)
    # strongly red pixels are present (a grayscale rendering would have r == g == b)
    assert ((rgb[:, 0] > 200) & (rgb[:, 1] < 60) & (rgb[:, 2] < 60)).sum() > 100
    json.dumps(grid.notes)


def test_adapt_table_says_no_labels(tmp_path):
    from rich.console import Console

    from jobs.commands.adapt import accuracy_rich_table

    shards = write_shards(tmp_path / "shards")
    none = _unlabelled_predictions(read_results(write_results(tmp_path / "a", shards)).predictions)
    console = Console(width=200, record=True)
    console.print(accuracy_rich_table(accuracy_table(none)))
    assert "no labels" in console.export_text()
