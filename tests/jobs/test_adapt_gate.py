"""`--gate entropy` in the job layer: stored with the predictions, checked on resume, applied by
the worker (a gated prediction is the step's own or the unadapted one, never another)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from adapt_fixtures import BATCH, ttt_checkpoint  # noqa: F401 (fixture)
from typer.testing import CliRunner

from jobs.adapt import AdaptRequest, _settings_diff, prepare_adapt
from jobs.cli import app
from jobs.shard_worker import SETTINGS_KEY, AdaptSettings, ShardWorker, predict_shard
from pipeline.checkpoint import load_checkpoint
from pipeline.errors import TTTPipeError
from pipeline.shards import read_shard


def _settings(ckpt_uri: str, **changes) -> AdaptSettings:
    ckpt = load_checkpoint(ckpt_uri)
    return AdaptSettings(method="ttt", weights_sha256=ckpt.manifest["weights_sha256"], steps=3,
                         lr=5e-2, batch_size=BATCH, **changes)


def _preds(worker: ShardWorker, shard) -> np.ndarray:
    table = predict_shard(worker.engine, shard, worker.settings)
    order = np.lexsort((table.column("sample_id").to_numpy(), table.column("step").to_numpy()))
    return table.column("pred").to_numpy()[order].reshape(worker.settings.steps + 1, -1)


def test_the_worker_gates_each_prediction_between_its_step_and_step_0(ttt_checkpoint, shard_dir):
    shard = read_shard(sorted(str(p) for p in Path(shard_dir).glob("*.parquet"))[-1])
    plain = _preds(ShardWorker(ttt_checkpoint, _settings(ttt_checkpoint)), shard)
    gated_worker = ShardWorker(ttt_checkpoint, _settings(ttt_checkpoint, gate="entropy"))
    assert gated_worker.engine.config.gate == "entropy"
    gated = _preds(gated_worker, shard)
    assert np.array_equal(gated[0], plain[0])
    assert ((gated == plain) | (gated == plain[:1])).all()
    assert (gated != plain).any()                                      # measured: it acts here


def test_gate_is_a_stored_setting_checked_on_resume(ttt_checkpoint, shard_dir, tmp_path):
    out = tmp_path / "out"
    (out / "predictions").mkdir(parents=True)
    uri = sorted(str(p) for p in Path(shard_dir).glob("*.parquet"))[0]
    target = out / "predictions" / f"{Path(uri).stem}.parquet"
    ShardWorker(ttt_checkpoint, _settings(ttt_checkpoint, gate="entropy")).process(uri, str(target))
    assert b'"gate": "entropy"' in pq.read_schema(target).metadata[SETTINGS_KEY.encode()]
    request = AdaptRequest(ttt_checkpoint, str(shard_dir), str(out), steps=3, lr=5e-2,
                           batch_size=BATCH)
    with pytest.raises(TTTPipeError, match="other settings .*gate 'entropy' vs 'none'"):
        prepare_adapt(dataclasses.replace(request, gate="none"))
    plan = prepare_adapt(request)  # no --gate: the checkpoint's, TTT's default "entropy"
    assert plan.settings.gate == "entropy" and plan.shards[0].done


def test_settings_an_older_ttt_pipe_did_not_write_count_as_defaults(ttt_checkpoint):
    ours = _settings(ttt_checkpoint)
    theirs = {k: v for k, v in dataclasses.asdict(ours).items()
              if k not in ("gate", "episodes", "protocol", "copies")}
    assert _settings_diff(theirs, ours) == []
    assert _settings_diff(theirs, dataclasses.replace(ours, gate="entropy")) == \
        ["gate 'none' vs 'entropy'"]


def test_unknown_gate_is_one_line(ttt_checkpoint, shard_dir, tmp_path):
    with pytest.raises(TTTPipeError, match="unknown gate 'maybe'; choose from: none, entropy"):
        prepare_adapt(AdaptRequest(ttt_checkpoint, str(shard_dir), str(tmp_path / "o"),
                                   gate="maybe"))
    result = CliRunner().invoke(app, ["adapt", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--gate" in result.output
