"""`--episodes G` and `--protocol per-sample` without Ray: a shard's predictions equal those of
G = 1 (same rows, batch boundaries, predictions), the settings are stored and checked on
resume, online mode refuses them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from adapt_fixtures import BATCH, ttt_checkpoint  # noqa: F401 (fixture)
from typer.testing import CliRunner

from jobs.adapt import AdaptRequest, prepare_adapt
from jobs.cli import app
from jobs.shard_worker import SETTINGS_KEY, AdaptSettings, ShardWorker, predict_shard
from pipeline.checkpoint import load_checkpoint
from pipeline.errors import TTTPipeError
from pipeline.methods import build_method_engine, resolve_method
from pipeline.shards import read_shard


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _settings(ckpt_uri: str, **changes) -> AdaptSettings:
    ckpt = load_checkpoint(ckpt_uri)
    base = AdaptSettings(method="ttt", weights_sha256=ckpt.manifest["weights_sha256"], steps=2,
                         lr=1e-2, batch_size=BATCH,  # the checkpoint's, as adapt would take them
                         gate=ckpt.manifest["method"]["config"].get("gate", "none"))
    return dataclasses.replace(base, **changes)


def _columns(table) -> dict[str, np.ndarray]:
    return {c: table.column(c).to_numpy() for c in table.column_names
            if c in ("sample_id", "step", "batch", "pred", "confidence", "loss")}


def _assert_same(a, b) -> None:
    for c in ("sample_id", "step", "batch", "pred"):
        assert np.array_equal(a[c], b[c]), c
    np.testing.assert_allclose(a["confidence"], b["confidence"], atol=1e-4)
    np.testing.assert_allclose(a["loss"], b["loss"], atol=1e-4, equal_nan=True)


PAPER = '{"optimizer": "sgd", "rotations": "rand"}'  # the TTT paper's per-sample setting


@pytest.mark.parametrize("protocol, copies, method_config",
                         [("batch", 0, "{}"), ("per-sample", 3, "{}"), ("per-sample", 3, PAPER)])
def test_episodes_give_the_predictions_of_one(ttt_checkpoint, shard_dir, protocol, copies, method_config):
    ckpt = load_checkpoint(ttt_checkpoint)
    config = resolve_method(ckpt, None, method_config).config
    engine = build_method_engine(ckpt, "ttt", config).eval()
    if method_config == PAPER:
        assert (engine.config.optimizer, engine.config.rotations) == ("sgd", "rand")
    shard = read_shard(sorted(str(p) for p in Path(shard_dir).glob("*.parquet"))[-1])
    one = _settings(ttt_checkpoint, protocol=protocol, copies=copies, method_config=method_config)
    reference = _columns(predict_shard(engine, shard, one))
    assert reference["batch"].max() == (len(shard) - 1) // BATCH     # the usual boundaries
    for g in (2, 3):                       # 16 samples in batches of 6, 6, 4: a ragged last
        _assert_same(_columns(predict_shard(engine, shard, dataclasses.replace(one, episodes=g))),
                     reference)
    if protocol == "per-sample":           # each image's loss; step 0: the unadapted model
        losses = reference["loss"][reference["step"] == 0]
        assert np.unique(losses).size > 1
        with torch.no_grad():
            base = engine.predict(torch.from_numpy(shard.pixels())).argmax(1).numpy()
        step0 = dict(zip(reference["sample_id"][reference["step"] == 0],
                         reference["pred"][reference["step"] == 0]))
        assert [step0[i] for i in shard.sample_ids] == base.tolist()


def test_settings_stored_and_checked_on_resume(ttt_checkpoint, shard_dir, tmp_path):
    out = tmp_path / "out"
    (out / "predictions").mkdir(parents=True)
    uri = sorted(str(p) for p in Path(shard_dir).glob("*.parquet"))[0]
    target = out / "predictions" / f"{Path(uri).stem}.parquet"
    ShardWorker(ttt_checkpoint, _settings(ttt_checkpoint, episodes=2)).process(uri, str(target))
    assert b'"episodes": 2' in pq.read_schema(target).metadata[SETTINGS_KEY.encode()]
    with pytest.raises(TTTPipeError, match="other settings .*episodes 2 vs 1"):
        prepare_adapt(AdaptRequest(ttt_checkpoint, str(shard_dir), str(out), steps=2, lr=1e-2,
                                   batch_size=BATCH))
    with pytest.raises(TTTPipeError, match="protocol 'batch' vs 'per-sample'"):
        prepare_adapt(AdaptRequest(ttt_checkpoint, str(shard_dir), str(out), steps=2, lr=1e-2,
                                   batch_size=BATCH, episodes=2, protocol="per-sample"))
    plan = prepare_adapt(AdaptRequest(ttt_checkpoint, str(shard_dir), str(out), steps=2,
                                      lr=1e-2, batch_size=BATCH, episodes=2))
    assert plan.settings.episodes == 2 and plan.settings.copies == 0
    assert plan.shards[0].done


def test_older_files_without_the_keys_count_as_defaults(ttt_checkpoint, shard_dir, tmp_path):
    out = tmp_path / "out"
    (out / "predictions").mkdir(parents=True)
    uri = sorted(str(p) for p in Path(shard_dir).glob("*.parquet"))[0]
    target = out / "predictions" / f"{Path(uri).stem}.parquet"
    ShardWorker(ttt_checkpoint, _settings(ttt_checkpoint)).process(uri, str(target))
    table = pq.read_table(target)
    meta = table.schema.metadata[SETTINGS_KEY.encode()].decode()
    for key in ('"copies": 0, ', '"episodes": 1, ', '"protocol": "batch", '):
        assert key in meta
        meta = meta.replace(key, "")
    pq.write_table(table.replace_schema_metadata({SETTINGS_KEY: meta}), target)
    plan = prepare_adapt(AdaptRequest(ttt_checkpoint, str(shard_dir), str(out), steps=2,
                                      lr=1e-2, batch_size=BATCH))
    assert plan.shards[0].done


def test_bad_values_and_online_mode(ttt_checkpoint, shard_dir, tmp_path):
    base = {"checkpoint": ttt_checkpoint, "shards": str(shard_dir), "out": str(tmp_path / "o")}
    with pytest.raises(TTTPipeError, match="use --mode episodic"):
        prepare_adapt(AdaptRequest(**base, mode="online", episodes=2))
    with pytest.raises(TTTPipeError, match="use --mode episodic"):
        prepare_adapt(AdaptRequest(**base, mode="online", protocol="per-sample"))
    with pytest.raises(TTTPipeError, match="--episodes must be an integer >= 1"):
        prepare_adapt(AdaptRequest(**base, episodes=0))
    with pytest.raises(TTTPipeError, match="unknown protocol 'paper'"):
        prepare_adapt(AdaptRequest(**base, protocol="paper"))
    plan = prepare_adapt(AdaptRequest(**base, protocol="per-sample", copies=8, episodes=4))
    assert (plan.settings.protocol, plan.settings.copies, plan.settings.episodes) == \
        ("per-sample", 8, 4)


def test_cli_help_and_bad_protocol():
    runner = CliRunner()
    result = runner.invoke(app, ["adapt", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--episodes", "--protocol", "--copies", "per-sample"):
        assert option in result.output
    bad = runner.invoke(app, ["adapt", "--checkpoint", "c", "--shards", "s", "--out", "o",
                              "--protocol", "paper"], env={"COLUMNS": "200"})
    assert bad.exit_code != 0 and "paper" in bad.output
