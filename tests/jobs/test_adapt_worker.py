"""`ttt-pipe adapt` without Ray: one shard through the worker, validation, the final count check."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from adapt_fixtures import BATCH, copy_shards, listing, ttt_checkpoint  # noqa: F401 (fixture)

from jobs.adapt import AdaptRequest, finalize_results, prepare_adapt
from jobs.shard_worker import SETTINGS_KEY, AdaptSettings, ShardWorker, predict_shard
from pipeline import storage
from pipeline.checkpoint import build_engine_from_checkpoint, load_checkpoint
from pipeline.errors import TTTPipeError
from pipeline.results import (PREDICTION_SCHEMA, SUMMARY_KEY, accuracy_from_summaries,
                              accuracy_table, summarize_predictions)
from pipeline.shards import read_shard, shard_metadata, shard_table


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()  # ShardWorker(threads=...) sets them process-wide
    yield
    torch.set_num_threads(threads)


def _settings(ckpt_uri: str, **changes) -> AdaptSettings:
    ckpt = load_checkpoint(ckpt_uri)
    base = AdaptSettings(method="ttt", weights_sha256=ckpt.manifest["weights_sha256"], steps=2,
                         lr=1e-2, batch_size=BATCH,  # the checkpoint's, as adapt would take them
                         gate=ckpt.manifest["method"]["config"].get("gate", "none"))
    return dataclasses.replace(base, **changes)


def _shard_uris(shard_dir: Path) -> list[str]:
    return [str(p) for p in sorted(Path(shard_dir).glob("*.parquet"))]


def test_predict_shard_rows_batches_and_baseline(ttt_checkpoint, shard_dir):
    ckpt = load_checkpoint(ttt_checkpoint)
    engine = build_engine_from_checkpoint(ckpt)
    shard = read_shard(_shard_uris(shard_dir)[-1])  # identity (stored uint8)
    settings = _settings(ttt_checkpoint)
    table = predict_shard(engine, shard, settings)
    assert table.schema.equals(PREDICTION_SCHEMA)
    n, steps = len(shard), settings.steps + 1
    assert table.num_rows == n * steps
    rows = table.to_pydict()
    position = {sid: i for i, sid in enumerate(shard.sample_ids.tolist())}
    for sid, batch in zip(rows["sample_id"], rows["batch"]):
        assert batch == position[sid] // BATCH  # fixed batch boundaries, in shard order
    assert max(rows["batch"]) == (n - 1) // BATCH
    # step 0 is the unadapted model
    with torch.no_grad():
        base = engine.predict(torch.tensor(shard.pixels())).argmax(1).numpy()
    step0 = {sid: p for sid, p, s in zip(rows["sample_id"], rows["pred"], rows["step"]) if s == 0}
    assert [step0[sid] for sid in shard.sample_ids.tolist()] == base.tolist()
    losses = np.array(rows["loss"])
    last = np.array(rows["step"]) == settings.steps
    assert np.isnan(losses[last]).all() and np.isfinite(losses[~last]).all()
    assert all(c == (lab == p) for c, lab, p in zip(rows["correct"], rows["label"], rows["pred"]))
    conf = np.array(rows["confidence"])
    assert ((conf >= 0.1 - 1e-6) & (conf <= 1.0)).all()


@pytest.mark.parametrize("mode", ["episodic", "online"])
def test_shard_results_do_not_depend_on_what_the_worker_did_before(ttt_checkpoint, shard_dir, mode,
                                                                   tmp_path):
    uris = _shard_uris(shard_dir)
    settings = _settings(ttt_checkpoint, mode=mode)
    busy = ShardWorker(ttt_checkpoint, settings, threads=1)
    (tmp_path / "busy").mkdir()
    for i, uri in enumerate(uris):  # one worker, every shard in turn
        busy.process(uri, str(tmp_path / "busy" / f"{i}.parquet"))
    (tmp_path / "fresh").mkdir()
    fresh = ShardWorker(ttt_checkpoint, settings, threads=1)
    fresh.process(uris[-1], str(tmp_path / "fresh" / "last.parquet"))
    a = (tmp_path / "busy" / f"{len(uris) - 1}.parquet").read_bytes()
    assert a == (tmp_path / "fresh" / "last.parquet").read_bytes()


def test_online_differs_from_episodic(ttt_checkpoint, shard_dir):
    """Sanity: the mode reaches the engine (online carries weights across batches)."""
    engine = build_engine_from_checkpoint(load_checkpoint(ttt_checkpoint))
    shard = read_shard(_shard_uris(shard_dir)[-1])
    ep = predict_shard(engine, shard, _settings(ttt_checkpoint, mode="episodic"))
    on = predict_shard(engine, shard, _settings(ttt_checkpoint, mode="online"))
    first = np.array(ep.column("batch")) == 0
    conf_ep, conf_on = np.array(ep.column("confidence")), np.array(on.column("confidence"))
    np.testing.assert_array_equal(conf_ep[first], conf_on[first])  # same start
    assert not np.array_equal(conf_ep[~first], conf_on[~first])


def test_process_writes_settings_metadata_and_nothing_else(ttt_checkpoint, shard_dir, tmp_path):
    settings = _settings(ttt_checkpoint)
    worker = ShardWorker(ttt_checkpoint, settings)
    assert not any(m.training for m in worker.engine.modules())  # adapts in eval mode
    summary = worker.process(_shard_uris(shard_dir)[0], str(tmp_path / "p.parquet"))
    assert summary["rows"] == summary["samples"] * 3
    meta = pq.read_schema(tmp_path / "p.parquet").metadata
    stored = {k: v for k, v in dataclasses.asdict(settings).items() if k != "fisher_dir"}
    assert json.loads(meta[SETTINGS_KEY.encode()]) == stored  # not where the data is mounted
    footer = json.loads(meta[SUMMARY_KEY.encode()])  # the summary travels with the rows
    assert footer == {k: summary[k] for k in footer} and footer["rows"] == summary["rows"]
    # beside it only its cost (kept out of the predictions: they stay byte-identical)
    assert listing(tmp_path) == ["p.cost.json", "p.parquet"]
    cost = json.loads((tmp_path / "p.cost.json").read_text())
    assert cost["shard"] == summary["shard"] and cost["samples"] == summary["samples"]
    assert cost["method"] == "ttt" and cost["device"] == "cpu" and cost["memory"] == "cpu_max_rss"
    assert 0 < cost["adapt_s"] < 60 and cost["peak_bytes"] >= cost["base_bytes"] > 10 * 2**20
    assert cost["actor"] == f"{worker.node or 'local'}:{worker.pid}"  # a node id once Ray is up


# --- validation before any Ray work -----------------------------------------------------

def _write_raw(path: Path, table) -> None:
    storage.atomic_write_table(table, str(path))


def _bad_shard(kind: str, path: Path) -> None:
    n = 4
    images = np.zeros((n, 1, 28, 28), np.float32)
    meta = shard_metadata(dataset="mnist", image_shape=(1, 28, 28), image_dtype="float32",
                          mean=0.1307, std=0.3081, seed=0,
                          corruption="gaussian_noise", severity=5)
    if kind == "nan":
        images[1, 0, 3, 3] = np.nan
    if kind == "empty":
        n, images = 0, images[:0]
    if kind == "other_dataset":
        meta = shard_metadata(dataset="fashion-mnist", image_shape=(1, 28, 28),
                              image_dtype="float32", mean=0.286, std=0.353, seed=0,
                              corruption="gaussian_noise", severity=5)
    table = shard_table(np.arange(n), np.zeros(n, np.int64), images, name=path.stem,
                        corruption="gaussian_noise", severity=5, metadata=meta)
    if kind == "schema":
        table = table.drop_columns(["label"])
    if kind in ("dup_ids", "dup_in_range"):
        ids = np.zeros(n, np.int64) if kind == "dup_ids" else np.array([0, 2, 2, 3])
        table = shard_table(ids, np.zeros(n, np.int64), images, name=path.stem,
                            corruption="gaussian_noise", severity=5, metadata=meta)
    if kind == "other_shape":
        rgb = np.zeros((n, 3, 32, 32), np.uint8)
        meta = shard_metadata(dataset="mnist", image_shape=(3, 32, 32), image_dtype="uint8",
                              mean=0.5, std=0.25, seed=0, corruption="gaussian_noise", severity=5)
        table = shard_table(np.arange(n), np.zeros(n, np.int64), rgb, name=path.stem,
                            corruption="gaussian_noise", severity=5, metadata=meta)
    _write_raw(path, table)


@pytest.mark.parametrize("kind, message", [
    ("empty", "empty"), ("schema", "not a ttt-pipe shard"),
    ("other_dataset", "fashion-mnist"), ("dup_ids", "repeats sample ids"),
    ("other_shape", "shape (3, 32, 32)"),
])
def test_bad_shard_is_one_line_error_naming_it(ttt_checkpoint, shard_dir, tmp_path, kind, message):
    """What the footer shows is refused before Ray starts (the driver reads no pixels)."""
    shards = copy_shards(shard_dir, tmp_path / "shards")
    bad = shards / "zzz_bad-s5-00000.parquet"
    _bad_shard(kind, bad)
    with pytest.raises(TTTPipeError) as err:
        prepare_adapt(AdaptRequest(ttt_checkpoint, str(shards), str(tmp_path / "out")))
    text = str(err.value)
    assert message in text and "zzz_bad" in text and "\n" not in text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind, message", [
    ("nan", "1 NaN or infinite pixels"), ("dup_in_range", "repeats sample ids"),
])
def test_content_checks_run_in_the_worker(ttt_checkpoint, shard_dir, tmp_path, kind, message):
    """NaN pixels and repeated ids need the pixels/ids: the driver plans the shard, the worker
    that reads it fails with one line naming it and writes nothing."""
    shards = copy_shards(shard_dir, tmp_path / "shards")
    bad = shards / "zzz_bad-s5-00000.parquet"
    _bad_shard(kind, bad)
    plan = prepare_adapt(AdaptRequest(ttt_checkpoint, str(shards), str(tmp_path / "out")))
    assert "zzz_bad-s5-00000" in [s.name for s in plan.shards]
    worker = ShardWorker(ttt_checkpoint, plan.settings, threads=1)
    with pytest.raises(TTTPipeError) as err:
        worker.process(str(bad), str(tmp_path / "p.parquet"))
    assert message in str(err.value) and "zzz_bad" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "p.parquet").exists()


def test_bad_checkpoint_and_inputs(ttt_checkpoint, shard_dir, tmp_path):
    out = str(tmp_path / "out")
    cases = {
        "no checkpoint": AdaptRequest(str(tmp_path / "nope"), str(shard_dir), out),
        "other method": AdaptRequest(ttt_checkpoint, str(shard_dir), out, method="it3"),
        "no shards": AdaptRequest(ttt_checkpoint, str(tmp_path / "none*.parquet"), out),
        "steps": AdaptRequest(ttt_checkpoint, str(shard_dir), out, steps=-1),
        "lr": AdaptRequest(ttt_checkpoint, str(shard_dir), out, lr=0.0),
        "batch": AdaptRequest(ttt_checkpoint, str(shard_dir), out, batch_size=2.5),
        "mode": AdaptRequest(ttt_checkpoint, str(shard_dir), out, mode="sometimes"),
    }
    for what, req in cases.items():
        with pytest.raises(TTTPipeError) as err:
            prepare_adapt(req)
        assert "\n" not in str(err.value), what
    tampered = copy_shards(Path(ttt_checkpoint), tmp_path / "tampered", "*")
    weights = tampered / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(TTTPipeError, match="sha256"):
        prepare_adapt(AdaptRequest(str(tampered), str(shard_dir), out))
    assert not Path(out).exists()


def test_defaults_come_from_the_checkpoint(ttt_checkpoint, shard_dir, tmp_path):
    plan = prepare_adapt(AdaptRequest(ttt_checkpoint, str(shard_dir), str(tmp_path / "o")))
    assert (plan.settings.steps, plan.settings.lr, plan.settings.batch_size) == (2, 1e-2, BATCH)
    assert plan.settings.mode == "episodic"
    plan = prepare_adapt(AdaptRequest(ttt_checkpoint, str(shard_dir), str(tmp_path / "o"),
                                      steps=1, lr=0.5, batch_size=4, mode="online"))
    assert (plan.settings.steps, plan.settings.lr, plan.settings.batch_size,
            plan.settings.mode) == (1, 0.5, 4, "online")
    assert len(plan.shards) == 4 and not plan.pending[0].done


def test_resume_refuses_predictions_of_other_settings(ttt_checkpoint, shard_dir, tmp_path):
    out = tmp_path / "out"
    (out / "predictions").mkdir(parents=True)
    uri = _shard_uris(shard_dir)[0]
    ShardWorker(ttt_checkpoint, _settings(ttt_checkpoint, steps=1)).process(
        uri, str(out / "predictions" / f"{Path(uri).stem}.parquet"))
    with pytest.raises(TTTPipeError, match="other settings .*steps 1 vs 2"):
        prepare_adapt(AdaptRequest(ttt_checkpoint, str(shard_dir), str(out)))
    plan = prepare_adapt(AdaptRequest(ttt_checkpoint, str(shard_dir), str(out), steps=1))
    assert [s.done for s in plan.shards] == [True, False, False, False]


def test_finalize_fails_loudly_on_missing_or_duplicated_rows(ttt_checkpoint, shard_dir, tmp_path):
    out = tmp_path / "out"
    plan = prepare_adapt(AdaptRequest(ttt_checkpoint, str(shard_dir), str(out)))
    (out / "predictions").mkdir(parents=True)
    worker = ShardWorker(ttt_checkpoint, plan.settings)
    for s in plan.shards:
        worker.process(s.uri, str(out / "predictions" / f"{s.name}.parquet"))
    accuracy = finalize_results(plan)
    assert sorted(set(accuracy.column("step").to_pylist())) == [0, 1, 2]
    cost = pq.read_table(out / "cost.parquet")  # the shards' cost sidecars, gathered
    assert cost.column("shard").to_pylist() == sorted(s.name for s in plan.shards)
    assert cost.column("samples").to_pylist() == [16] * len(plan.shards)
    (out / "predictions" / f"{plan.shards[0].name}.cost.json").unlink()  # an older shard: no cost
    finalize_results(plan)
    assert pq.read_table(out / "cost.parquet").num_rows == len(plan.shards) - 1
    assert accuracy.column("n").to_pylist() == [32] * len(accuracy)  # 2 shards of 16 per kind
    everything = pa.concat_tables([pq.read_table(p).replace_schema_metadata(None)
                                   for p in sorted((out / "predictions").glob("*.parquet"))])
    assert accuracy.equals(accuracy_table(everything))  # summaries sum to the same table
    (out / "accuracy.parquet").unlink()
    victim = out / "predictions" / f"{plan.shards[1].name}.parquet"
    table = pq.read_table(victim)
    missing = table.slice(1)  # footer: one row fewer than its summary says
    duplicated = pa.concat_tables([table.slice(1), table.slice(1, 1)])  # same count, one twice
    old_style = {SETTINGS_KEY.encode(): table.schema.metadata[SETTINGS_KEY.encode()]}
    # a file of an older ttt-pipe (no summary in its footer) is read and checked instead
    for broken in (missing, duplicated.replace_schema_metadata(old_style)):
        pq.write_table(broken, victim)
        with pytest.raises(TTTPipeError, match=plan.shards[1].name):
            finalize_results(plan)
        assert not (out / "accuracy.parquet").exists()
    pq.write_table(table.replace_schema_metadata(old_style), victim)
    assert finalize_results(plan).equals(accuracy)


def test_summary_checks_one_prediction_per_sample_and_step(ttt_checkpoint, shard_dir):
    settings = _settings(ttt_checkpoint)
    shard = read_shard(_shard_uris(shard_dir)[0])
    table = predict_shard(ShardWorker(ttt_checkpoint, settings).engine, shard, settings)
    k = settings.steps + 1
    summary = summarize_predictions(table, shard.name, k)
    assert summary["rows"] == table.num_rows == 16 * k and summary["samples"] == 16
    assert [g[3] for g in summary["groups"]] == [0, 1, 2] and {g[4] for g in summary["groups"]} == {16}
    assert accuracy_from_summaries([summary]).equals(accuracy_table(table))
    broken = {"duplicated": (pa.concat_tables([table.slice(1), table.slice(1, 1)]), k),
              "missing": (table.slice(1), k), "steps beyond K": (table, k - 1)}
    for what, (bad, steps) in broken.items():
        with pytest.raises(TTTPipeError, match=shard.name) as err:
            summarize_predictions(bad, shard.name, steps)
        assert "\n" not in str(err.value), what


def test_one_host_copy_per_batch_and_no_per_step_syncs(ttt_checkpoint, shard_dir, monkeypatch):
    """Results come back to the host once per batch: no .item()/.tolist() per step.

    On the CPU a device-to-host copy is free but still a call: count the calls that would
    sync with a GPU (`Tensor.cpu`, `.item`, `.tolist`) while a 16-sample shard is adapted
    in batches of 6 (3 batches, 2 steps each).
    """
    settings = _settings(ttt_checkpoint)
    shard = read_shard(_shard_uris(shard_dir)[0])
    engine = ShardWorker(ttt_checkpoint, settings).engine
    expected = predict_shard(engine, shard, settings)
    calls = {"cpu": 0, "item": 0, "tolist": 0}
    for name in calls:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    table = predict_shard(engine, shard, settings)
    monkeypatch.undo()
    assert calls == {"cpu": 3, "item": 0, "tolist": 0}
    for column in table.column_names:  # (Table.equals: NaN != NaN in the loss column)
        x, y = table.column(column).to_numpy(), expected.column(column).to_numpy()
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), column


def test_prefetch_reads_the_next_shard_ahead_without_changing_results(ttt_checkpoint, shard_dir,
                                                                      tmp_path, monkeypatch):
    import jobs.shard_worker as sw

    uris = _shard_uris(shard_dir)
    settings = _settings(ttt_checkpoint)
    plain, ahead = tmp_path / "plain", tmp_path / "ahead"
    plain.mkdir(), ahead.mkdir()
    worker = ShardWorker(ttt_checkpoint, settings)
    for uri in uris:
        worker.process(uri, str(plain / Path(uri).name))
    reads: list[str] = []
    real = sw.read_shard
    monkeypatch.setattr(sw, "read_shard", lambda uri: reads.append(uri) or real(uri))
    worker = ShardWorker(ttt_checkpoint, settings)
    for uri, nxt in zip(uris, [*uris[1:], None]):
        worker.process(uri, str(ahead / Path(uri).name), next_uri=nxt)
    assert reads == uris  # each shard read once: all but the first in the background
    worker.process(uris[0], str(ahead / "again.parquet"), next_uri=uris[1])
    worker.process(uris[2], str(ahead / "other.parquet"))  # not the prefetched one: read directly
    assert reads[-2:] == [uris[1], uris[2]]
    for uri in uris:
        name = Path(uri).name
        assert (plain / name).read_bytes() == (ahead / name).read_bytes(), name
