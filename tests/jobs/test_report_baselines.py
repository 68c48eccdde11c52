"""The source baseline is used only for the same model (pipeline/report/baseline.py
`same_model`, run.json `checkpoint.model_sha256` from pipeline.checkpoint `model_sha256`)."""

from __future__ import annotations

import json

import pytest
import torch

import report_fixtures as rf
from pipeline.checkpoint import Checkpoint, model_sha256
from pipeline.report.compare import side_by_side
from pipeline.results import read_results


def _ckpt(method: str, state: dict) -> Checkpoint:
    return Checkpoint("/x", {"method": {"name": method}}, state)


def test_model_sha256_hashes_the_model_not_the_aux_head():
    torch.manual_seed(0)
    model = {"conv.weight": torch.randn(4, 1, 3, 3), "bn.num_batches_tracked": torch.tensor(3),
             "fc.bias": torch.randn(10)}
    source = _ckpt("source", model)
    joint = _ckpt("ttt", {**{f"model.{k}": v for k, v in reversed(model.items())},
                          "head.weight": torch.randn(2, 4)})
    assert model_sha256(source) == model_sha256(joint)  # same network, other key order, plus a head
    other_head = _ckpt("ttt", {**joint.state_dict, "head.weight": torch.zeros(2, 4)})
    assert model_sha256(other_head) == model_sha256(source)
    trained = _ckpt("ttt", {**joint.state_dict, "model.fc.bias": model["fc.bias"] + 1e-6})
    assert model_sha256(trained) != model_sha256(source)
    as_half = _ckpt("source", {**model, "fc.bias": model["fc.bias"].half()})
    assert model_sha256(as_half) != model_sha256(source)


def _set_checkpoint(folder, checkpoint: dict):
    run = json.loads((folder / "run.json").read_text())
    (folder / "run.json").write_text(json.dumps({**run, "checkpoint": checkpoint}))


def test_source_tent_ttt_only_tent_is_compared_with_source(tmp_path):
    """`--method source,tent,ttt`: tent adapted the source model, ttt its own joint one."""
    shards = rf.write_shards(tmp_path / "shards")
    source = rf.write_results(tmp_path / "source", shards, "source", offset=2, steps=0, settings={})
    tent = rf.write_results(tmp_path / "tent", shards, "tent", settings={})
    ttt = rf.write_results(tmp_path / "ttt", shards, "ttt", offset=1, settings={}, model="joint")
    online = rf.write_results(tmp_path / "ttt_online", shards, "ttt", settings={"mode": "online"},
                              model="joint")
    table = side_by_side([read_results(str(p)) for p in (source, tent, ttt, online)])
    labels = [e.label for e in table.entries]
    assert labels[1] == "tent", labels
    kinds = dict(zip(["source", "tent", "ttt", "ttt_online"], (e.baseline for e in table.entries)))
    assert kinds["tent"].kind == "source" and kinds["tent"].source.results.path == str(source)
    assert kinds["ttt"].kind == "step0"  # episodic: its own step 0 is ITS unadapted model
    assert "no source run of the same model on the same shards" in kinds["ttt"].why
    assert kinds["ttt_online"].kind == "none" and "online mode" in kinds["ttt_online"].why
    assert any(n.startswith(f"{labels[2]} not compared with") and "another model" in n
               for n in table.notes), table.notes
    # the gains: tent vs source's step 0, ttt vs its own step 0 (not source's numbers)
    row = next(r for r in table.rows if (r.corruption, r.severity) == ("fog", "3"))
    t = 2
    ttt_fog = read_results(str(ttt)).accuracy.to_pylist()
    at = {r["step"]: r["accuracy"] for r in ttt_fog if r["corruption"] == "fog"}
    assert row.gains[t] == pytest.approx(at[max(at)] - at[0])


def test_old_run_json_needs_equal_checkpoint_sha(tmp_path):
    shards = rf.write_shards(tmp_path / "shards")
    source = rf.write_results(tmp_path / "source", shards, "source", offset=2, steps=0, model=None)
    tent = rf.write_results(tmp_path / "tent", shards, "tent", model=None)
    (entry, _) = side_by_side([read_results(str(tent)), read_results(str(source))]).entries
    assert entry.baseline.kind == "none"  # tent: no step-0 fallback, and the model is not known
    table = side_by_side([read_results(str(tent)), read_results(str(source))])
    assert any("the same model is not known" in n for n in table.notes), table.notes
    for folder in (source, tent):  # the very same checkpoint file: the same model
        _set_checkpoint(folder, {"uri": "/ckpt/demo", "weights_sha256": "abc"})
    (entry, _) = side_by_side([read_results(str(tent)), read_results(str(source))]).entries
    assert entry.baseline.kind == "source"
    _set_checkpoint(tent, {"uri": "/ckpt/other", "weights_sha256": "def"})
    (entry, _) = side_by_side([read_results(str(tent)), read_results(str(source))]).entries
    assert entry.baseline.kind == "none"
