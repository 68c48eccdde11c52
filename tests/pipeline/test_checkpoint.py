"""The checkpoint directory: atomic writes, sha-verified weights_only loads, one-line errors."""

from __future__ import annotations

import hashlib
import io
import json
import os

import pytest
import torch

import engines
from pipeline.checkpoint import (FORMAT_VERSION, MANIFEST_NAME, WEIGHTS_NAME, Checkpoint,
                                 build_engine_from_checkpoint, load_checkpoint, save_checkpoint)
from pipeline.errors import TTTPipeError
from pipeline.models import build_model

KWARGS = {"mean": 0.1307, "std": 0.3081, "num_classes": 10}


def _engine(method: str = "ttt", seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("seed_cnn" if method == "ttt" else "seed_rescnn", **KWARGS)
    return engines.get_engine(method)(model, torch.zeros(1, 1, 28, 28), None)


def _manifest(engine, method: str = "ttt") -> dict:
    return {
        "model": {"name": "seed_cnn" if method == "ttt" else "seed_rescnn", "kwargs": KWARGS},
        "method": {"name": method, "config": engine.config.to_dict()},
        "dataset": {"name": "mnist", **KWARGS, "image_shape": [1, 28, 28]},
        "training": {"epochs": 1, "batch_size": 64, "lr": 0.01, "seed": 0, "limit": None,
                     "metrics": [{"epoch": 1, "loss": 1.0, "accuracy": 0.5, "aux_loss": 1.2}],
                     "seconds": 0.1},
    }


@pytest.fixture
def saved(tmp_path):
    engine = _engine()
    uri = str(tmp_path / "ckpt")
    manifest = save_checkpoint(uri, engine.state_dict(), _manifest(engine))
    return uri, engine, manifest


def _one_line_error(fn, *match: str) -> str:
    with pytest.raises(TTTPipeError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for word in match:
        assert word in message
    return message


def test_roundtrip_verifies_sha_and_loads_tensors(saved):
    uri, engine, manifest = saved
    assert sorted(os.listdir(uri)) == [MANIFEST_NAME, WEIGHTS_NAME]
    on_disk = json.loads(open(os.path.join(uri, MANIFEST_NAME)).read())
    assert on_disk == manifest and on_disk["format_version"] == FORMAT_VERSION
    weights = open(os.path.join(uri, WEIGHTS_NAME), "rb").read()
    assert hashlib.sha256(weights).hexdigest() == on_disk["weights_sha256"]
    plain = torch.load(io.BytesIO(weights), weights_only=True)  # tensors only
    ckpt = load_checkpoint(uri, expect_method="ttt")
    assert isinstance(ckpt, Checkpoint) and ckpt.method == "ttt" and ckpt.dataset == "mnist"
    assert plain.keys() == ckpt.state_dict.keys() == engine.state_dict().keys()
    for key, value in engine.state_dict().items():
        assert torch.equal(ckpt.state_dict[key], value)


def test_save_replaces_a_checkpoint_and_leaves_no_temporaries(saved, tmp_path):
    uri, _, first = saved
    other = _engine(seed=1)
    second = save_checkpoint(uri, other.state_dict(), _manifest(other))
    assert second["weights_sha256"] != first["weights_sha256"]
    assert load_checkpoint(uri).manifest["weights_sha256"] == second["weights_sha256"]
    assert os.listdir(tmp_path) == ["ckpt"]  # no .ckpt.tmp-* / .ckpt.old-* left


def test_save_refuses_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    engine = _engine()
    _one_line_error(lambda: save_checkpoint(str(tmp_path), engine.state_dict(), _manifest(engine)),
                    "refusing to overwrite")
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    engine = _engine()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        save_checkpoint(str(tmp_path / "ckpt"), engine.state_dict(), _manifest(engine))
    assert os.listdir(tmp_path) == []


def test_missing_checkpoint(tmp_path):
    _one_line_error(lambda: load_checkpoint(str(tmp_path / "nope")), "no checkpoint", "ttt-pipe train")


def test_missing_weights_and_missing_manifest(saved):
    uri, _, _ = saved
    os.remove(os.path.join(uri, MANIFEST_NAME))
    _one_line_error(lambda: load_checkpoint(uri), "no manifest.json")
    os.remove(os.path.join(uri, WEIGHTS_NAME))
    _one_line_error(lambda: load_checkpoint(uri), "no checkpoint")


def test_truncated_weights(saved):
    uri, _, _ = saved
    path = os.path.join(uri, WEIGHTS_NAME)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    _one_line_error(lambda: load_checkpoint(uri), "sha256", "retrain")


def test_tampered_weights_same_length(saved):
    uri, _, _ = saved
    path = os.path.join(uri, WEIGHTS_NAME)
    data = bytearray(open(path, "rb").read())
    data[-100] ^= 0xFF
    open(path, "wb").write(bytes(data))
    _one_line_error(lambda: load_checkpoint(uri), "sha256")


def test_truncated_manifest(saved):
    uri, _, _ = saved
    path = os.path.join(uri, MANIFEST_NAME)
    text = open(path).read()
    open(path, "w").write(text[: len(text) // 2])
    _one_line_error(lambda: load_checkpoint(uri), "not valid JSON")


def test_unknown_format_version(saved):
    uri, _, manifest = saved
    manifest["format_version"] = 99
    open(os.path.join(uri, MANIFEST_NAME), "w").write(json.dumps(manifest))
    _one_line_error(lambda: load_checkpoint(uri), "format_version 99")


def test_other_method_or_dataset_than_asked(saved):
    uri, _, _ = saved
    _one_line_error(lambda: load_checkpoint(uri, expect_method="it3"), "'ttt'", "'it3'")
    _one_line_error(lambda: load_checkpoint(uri, expect_dataset="fashion-mnist"), "'mnist'")


def test_arbitrary_pickle_is_refused_even_with_a_matching_sha(saved):
    uri, _, manifest = saved
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(1), "payload": os.getcwd}, buf)  # a global: needs full pickle
    data = buf.getvalue()
    open(os.path.join(uri, WEIGHTS_NAME), "wb").write(data)
    manifest["weights_sha256"] = hashlib.sha256(data).hexdigest()
    open(os.path.join(uri, MANIFEST_NAME), "w").write(json.dumps(manifest))
    _one_line_error(lambda: load_checkpoint(uri), "cannot load checkpoint weights")


@pytest.mark.parametrize("method", ["ttt", "it3"])
def test_build_engine_from_checkpoint_reproduces_the_engine(tmp_path, method):
    engine = _engine(method, seed=3)
    uri = str(tmp_path / method)
    save_checkpoint(uri, engine.state_dict(), _manifest(engine, method))
    rebuilt = build_engine_from_checkpoint(load_checkpoint(uri, expect_method=method))
    assert type(rebuilt) is type(engine) and rebuilt.config == engine.config
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(rebuilt.predict(x), engine.predict(x))


def test_build_engine_rejects_weights_of_another_model(tmp_path):
    engine = _engine("ttt")
    manifest = _manifest(engine)
    manifest["model"]["name"] = "seed_rescnn"  # weights are seed_cnn's
    save_checkpoint(str(tmp_path / "c"), engine.state_dict(), manifest)
    ckpt = load_checkpoint(str(tmp_path / "c"))
    _one_line_error(lambda: build_engine_from_checkpoint(ckpt), "does not fit", "seed_rescnn")
