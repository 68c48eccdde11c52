"""Which method adapts a checkpoint (pipeline/methods.py) and the driver's checks, no Ray:
defaults, --method-config validation, joint methods on other checkpoints, EATA's Fisher data,
resume refusing another method, import-model and train for the methods without joint training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import engines
from jobs.adapt import AdaptRequest, prepare_adapt
from jobs.shard_worker import ShardWorker, build_adapt_engine
from pipeline.checkpoint import build_engine_from_checkpoint, load_checkpoint, save_checkpoint
from pipeline.errors import TTTPipeError
from pipeline.methods import (FISHER_SAMPLES, FisherSource, attach_fisher, build_method_engine,
                              checkpoint_agnostic_methods, fisher_images, resolve_fisher,
                              resolve_method)
from pipeline.models import build_model
from pipeline.results import predictions_uri

MEAN, STD = 0.1307, 0.3081
AGNOSTIC = ["cotta", "eata", "lame", "memo", "norm", "sar", "source", "tent"]


def _checkpoint(out: Path, method: str = "source", model: str = "seed_cnn_bn", **config) -> str:
    """An untrained checkpoint written in-process: a source model alone, or a joint engine."""
    torch.manual_seed(0)
    net = build_model(model, mean=MEAN, std=STD)
    if method == "source":
        weights, cfg = net.state_dict(), dict(config)
    else:
        cls = engines.get_engine(method)
        cfg = cls.config_cls(**config).to_dict()
        weights = cls(net, torch.zeros(1, 1, 28, 28), cfg).state_dict()
    manifest = {"model": {"name": model, "kwargs": {"mean": MEAN, "std": STD}},
                "method": {"name": method, "config": cfg},
                "dataset": {"name": "mnist", "mean": MEAN, "std": STD, "num_classes": 10,
                            "image_shape": [1, 28, 28]},
                "training": {"epochs": 0, "metrics": []}}
    save_checkpoint(str(out), weights, manifest)
    return str(out)


@pytest.fixture(scope="module")
def source_ckpt(tmp_path_factory):
    return load_checkpoint(_checkpoint(tmp_path_factory.mktemp("m") / "source"))


@pytest.fixture(scope="module")
def ttt_ckpt(tmp_path_factory):
    return load_checkpoint(_checkpoint(tmp_path_factory.mktemp("m") / "ttt", "ttt", steps=2,
                                       batch_size=6))


def test_the_agnostic_methods_are_every_engine_without_joint_training():
    assert checkpoint_agnostic_methods() == AGNOSTIC


@pytest.mark.parametrize("method", AGNOSTIC)
def test_every_agnostic_method_adapts_a_source_checkpoint_with_its_defaults(source_ckpt, method):
    choice = resolve_method(source_ckpt, method)
    defaults = engines.get_engine(method).config_cls().to_dict()
    if method == "source":  # the checkpoint's own method: its stored config (here empty)
        assert choice.own_checkpoint
    assert choice.config == defaults and choice.overrides == {}
    engine = build_method_engine(source_ckpt, method, choice.config)
    assert type(engine) is engines.get_engine(method)
    model = {k: v for k, v in engine.state_dict().items() if k.startswith("model.")}
    assert model.keys() == {f"model.{k}" for k in source_ckpt.state_dict}
    assert all(torch.equal(model[f"model.{k}"], v) for k, v in source_ckpt.state_dict.items())


def test_own_method_takes_the_checkpoint_config_then_the_overrides(ttt_ckpt):
    choice = resolve_method(ttt_ckpt, None, '{"rotations": "rand", "lr": 0.5}')
    assert choice.name == "ttt" and choice.own_checkpoint
    assert (choice.config["steps"], choice.config["batch_size"]) == (2, 6)   # the checkpoint's
    assert (choice.config["rotations"], choice.config["lr"]) == ("rand", 0.5)  # overridden
    engine = build_method_engine(ttt_ckpt, "ttt", choice.config)
    assert engine.config.rotations == "rand"
    assert all(torch.equal(engine.state_dict()[k], v) for k, v in ttt_ckpt.state_dict.items())


def test_a_joint_checkpoint_lends_its_model_alone_to_tent(tmp_path):
    ckpt = load_checkpoint(_checkpoint(tmp_path / "ttt", "ttt", model="seed_cnn_bn"))
    choice = resolve_method(ckpt, "tent")
    assert not choice.own_checkpoint and choice.config["steps"] == 1  # tent's defaults
    engine = build_method_engine(ckpt, "tent", choice.config)
    assert not any(k.startswith("head.") for k in engine.state_dict())
    assert torch.equal(engine.model.fc2.weight, ckpt.state_dict["model.fc2.weight"])


@pytest.mark.parametrize("method, config, message", [
    ("ttt", None, "ttt adapts only a checkpoint trained jointly .* 'source' checkpoint; make one "
                  "with ttt-pipe train --method ttt"),
    ("it3", None, "it3 adapts only"),
    ("nope", None, "unknown method 'nope'; choose from: cotta, eata"),
    ("tent", '{"bogus": 1, "steps": 2}', "unknown TentConfig key\\(s\\) bogus; choose from: "
                                         "adam_eps, adapt_params"),
    ("tent", '{"steps": "two"}', "TentConfig.steps must be a int"),
    ("tent", "[1]", "must be a JSON object"),
    ("tent", "{steps: 1}", "not valid JSON"),
    ("norm", '{"adapt_params": "model"}', "norm changes no parameter"),
])
def test_bad_method_choices_are_one_line_errors(source_ckpt, method, config, message):
    with pytest.raises(TTTPipeError, match=message) as info:
        resolve_method(source_ckpt, method, config)
    assert "\n" not in str(info.value)


def test_a_joint_method_keeps_the_fields_its_weights_were_trained_with(ttt_ckpt):
    for key, value in (("layer", "fc1"), ("aux_weight", 1.0)):
        with pytest.raises(TTTPipeError, match=f"cannot change {key} of ttt"):
            resolve_method(ttt_ckpt, None, {key: value})
    with pytest.raises(TTTPipeError, match="it3 adapts only"):
        resolve_method(ttt_ckpt, "it3")


def test_tent_on_a_model_without_norm_layers_fails_in_the_driver(tmp_path, shard_dir):
    ckpt = _checkpoint(tmp_path / "plain", model="seed_cnn")
    req = AdaptRequest(checkpoint=ckpt, shards=str(shard_dir), out=str(tmp_path / "r"), method="tent")
    with pytest.raises(TTTPipeError, match="selects no trainable parameter"):
        prepare_adapt(req)
    plan = prepare_adapt(AdaptRequest(checkpoint=ckpt, shards=str(shard_dir), out=str(tmp_path / "r"),
                                      method="tent", method_config='{"adapt_params": "model"}'))
    assert json.loads(plan.settings.method_config) == {"adapt_params": "model"}
    assert not (tmp_path / "r").exists()  # validation writes nothing


def test_settings_defaults_come_from_the_method_and_the_flags_win(tmp_path, shard_dir):
    ckpt = _checkpoint(tmp_path / "src")
    base = dict(checkpoint=ckpt, shards=str(shard_dir), out=str(tmp_path / "r"))
    s = prepare_adapt(AdaptRequest(**base)).settings
    assert (s.method, s.steps, s.batch_size, s.mode) == ("source", 0, 200, "online")
    s = prepare_adapt(AdaptRequest(**base, method="memo")).settings
    assert (s.method, s.steps, s.lr, s.batch_size, s.mode) == ("memo", 1, 5e-3, 32, "episodic")
    s = prepare_adapt(AdaptRequest(**base, method="tent", steps=3,
                                   method_config={"steps": 2, "lr": 0.01})).settings
    assert (s.steps, s.lr) == (3, 0.01)  # --steps wins over --method-config, which wins over tent's
    with pytest.raises(TTTPipeError, match="ttt adapts only"):
        prepare_adapt(AdaptRequest(**base, method="ttt"))


def test_resume_refuses_another_method_or_method_config(tmp_path, shard_dir):
    """A shard adapted in-process (the actor's class, no Ray) with norm: a rerun into the same
    results folder with tent, or with norm and another --method-config, is refused."""
    ckpt = _checkpoint(tmp_path / "src")
    base = dict(checkpoint=ckpt, shards=str(shard_dir), out=str(tmp_path / "r"), batch_size=8)
    plan = prepare_adapt(AdaptRequest(**base, method="norm"))
    shard = plan.shards[0]
    (tmp_path / "r" / "predictions").mkdir(parents=True)  # as jobs.adapt._start_results does
    worker = ShardWorker(plan.checkpoint, plan.settings)
    worker.process(shard.uri, predictions_uri(plan.request.out, shard.uri))
    assert prepare_adapt(AdaptRequest(**base, method="norm")).shards[0].done
    with pytest.raises(TTTPipeError, match="other settings \\(method 'norm' vs 'tent'"):
        prepare_adapt(AdaptRequest(**base, method="tent"))
    with pytest.raises(TTTPipeError, match="other settings \\(method_config"):
        prepare_adapt(AdaptRequest(**base, method="norm", method_config='{"bn_prior": 0.5}'))


# -- EATA's Fisher ------------------------------------------------------------------------
def test_fisher_options_are_for_eata_only(source_ckpt, idx_dir):
    with pytest.raises(TTTPipeError, match="apply to eata only"):
        resolve_fisher(resolve_method(source_ckpt, "tent"), source_ckpt, "train", None)
    off = resolve_method(source_ckpt, "eata", {"fisher_alpha": 0})
    assert resolve_fisher(off, source_ckpt, None, None) == FisherSource()
    with pytest.raises(TTTPipeError, match="eata with fisher_alpha > 0"):
        resolve_fisher(off, source_ckpt, None, 10)
    eata = resolve_method(source_ckpt, "eata")
    found = resolve_fisher(eata, source_ckpt, None, None, str(idx_dir / "mnist"))
    assert found == FisherSource("train", FISHER_SAMPLES, str(idx_dir / "mnist"))
    with pytest.raises(TTTPipeError, match="--fisher-samples must be an integer >= 1"):
        resolve_fisher(eata, source_ckpt, None, 0, str(idx_dir / "mnist"))


def test_fisher_from_clean_shards_checks_their_footers(source_ckpt, shard_dir, tmp_path):
    eata = resolve_method(source_ckpt, "eata")
    assert resolve_fisher(eata, source_ckpt, str(shard_dir), 10) == FisherSource(str(shard_dir), 10)
    other = load_checkpoint(_checkpoint(tmp_path / "fm", model="seed_cnn_bn"))
    other.manifest["dataset"]["name"] = "fashion-mnist"
    with pytest.raises(TTTPipeError, match="holds 'mnist' images .* the checkpoint 'fashion-mnist'"):
        resolve_fisher(eata, other, str(shard_dir), 10)


def test_missing_fisher_data_is_one_line_error(source_ckpt, tmp_path):
    eata = resolve_method(source_ckpt, "eata")
    with pytest.raises(TTTPipeError, match="EATA's Fisher reads clean mnist train images: mnist "
                                           "IDX files not found .*--fisher-data SHARDS"):
        resolve_fisher(eata, source_ckpt, None, None, str(tmp_path / "empty"))
    with pytest.raises(TTTPipeError, match="no shards"):
        resolve_fisher(eata, source_ckpt, str(tmp_path / "none*.parquet"), None)


def test_fisher_images_are_a_seeded_subset(source_ckpt, idx_dir, shard_dir):
    from pipeline.datasets import load_split
    from pipeline.datasets.base import to_float

    src = FisherSource("train", 20, str(idx_dir / "mnist"))
    a, b = fisher_images(src, source_ckpt, seed=0), fisher_images(src, source_ckpt, seed=0)
    assert a.shape == (20, 1, 28, 28) and a.dtype == np.float32 and np.array_equal(a, b)
    assert not np.array_equal(a, fisher_images(src, source_ckpt, seed=1))
    train = to_float(load_split("mnist", "train", data_dir=idx_dir / "mnist").images)
    rows = [int(np.flatnonzero((train == img).all(axis=(1, 2, 3)))[0]) for img in a]
    assert rows == sorted(set(rows))  # distinct training images, in split order
    every = fisher_images(FisherSource("train", 1000, str(idx_dir / "mnist")), source_ckpt)
    assert np.array_equal(every, train)  # fewer than asked: all of them
    shards = fisher_images(FisherSource(str(shard_dir), 10), source_ckpt)
    assert shards.shape == (10, 1, 28, 28)


def test_eata_actor_engine_gets_the_fisher_of_the_chosen_images(tmp_path, idx_dir, shard_dir):
    ckpt = _checkpoint(tmp_path / "src")
    plan = prepare_adapt(AdaptRequest(checkpoint=ckpt, shards=str(shard_dir), out=str(tmp_path / "r"),
                                      method="eata", fisher_samples=24,
                                      data_dir=str(idx_dir / "mnist"), batch_size=8))
    s = plan.settings
    assert (s.fisher_data, s.fisher_samples, s.fisher_dir) == ("train", 24, str(idx_dir / "mnist"))
    engine = build_adapt_engine(plan.checkpoint, s)
    fisher = dict(engine.fisher.named_buffers())
    assert sorted(fisher) == sorted(f"{n.replace('.', '__')}__{kind}"
                                    for n, _ in engine.adapted_parameters()
                                    for kind in ("anchor", "fisher"))
    assert all(torch.isfinite(v).all() for v in fisher.values())
    assert any(v.abs().sum() > 0 for k, v in fisher.items() if k.endswith("__fisher"))
    again = build_adapt_engine(plan.checkpoint, s)  # deterministic: same images, same Fisher
    assert all(torch.equal(v, dict(again.fisher.named_buffers())[k]) for k, v in fisher.items())
    manual = build_method_engine(plan.checkpoint, "eata", resolve_method(plan.checkpoint, "eata").config)
    manual.eval()
    attach_fisher(manual, FisherSource("train", 24, str(idx_dir / "mnist")), plan.checkpoint, 0, 8)
    assert all(torch.equal(v, dict(manual.fisher.named_buffers())[k]) for k, v in fisher.items())
    other = dict(build_adapt_engine(plan.checkpoint, s.__class__(**{**s.__dict__, "seed": 1}))
                 .fisher.named_buffers())
    assert any(not torch.equal(v, other[k]) for k, v in fisher.items() if k.endswith("__fisher"))


# -- import-model and train for the methods without joint training --------------------------
def test_import_model_for_tent_writes_a_tent_checkpoint(tmp_path, shard_dir):
    from pipeline.model_import import import_model

    file = tmp_path / "w.pt"
    torch.save(build_model("seed_cnn_bn").state_dict(), file)
    manifest = import_model("seed_cnn_bn", str(file), "mnist", str(tmp_path / "ck"), method="tent")
    assert manifest["method"]["name"] == "tent"
    assert manifest["method"]["config"] == engines.TentConfig().to_dict()
    ckpt = load_checkpoint(str(tmp_path / "ck"))
    assert "method_state.step" in ckpt.state_dict  # as the engine initialises it
    assert type(build_engine_from_checkpoint(ckpt)) is engines.TentEngine
    plan = prepare_adapt(AdaptRequest(checkpoint=str(tmp_path / "ck"), shards=str(shard_dir),
                                      out=str(tmp_path / "r")))
    assert plan.settings.method == "tent"  # adapted with tent by default
    assert prepare_adapt(AdaptRequest(checkpoint=str(tmp_path / "ck"), shards=str(shard_dir),
                                      out=str(tmp_path / "r"), method="sar")).settings.method == "sar"
    with pytest.raises(TTTPipeError, match="auxiliary part .*needs training"):
        import_model("seed_cnn_bn", str(file), "mnist", str(tmp_path / "ck2"), method="ttt")


def test_train_source_needs_no_layer_and_refuses_aux_options(idx_dir, tmp_path):
    from jobs.train import resolve_spec

    spec = resolve_spec("source", "mnist", str(tmp_path / "s"), data_dir=str(idx_dir / "mnist"))
    assert spec.model == "seed_cnn_bn" and spec.config["layer"] == ""
    assert spec.config == engines.SourceConfig(seed=0).to_dict()
    for kwargs in ({"aux_weight": 0.5}, {"layer": "fc1"}):
        with pytest.raises(TTTPipeError, match="source trains the model alone"):
            resolve_spec("source", "mnist", str(tmp_path / "s"), **kwargs)
    with pytest.raises(TTTPipeError, match="tent has no part to train; .*--method source"):
        resolve_spec("tent", "mnist", str(tmp_path / "s"))


def test_supervised_engine_trains_the_model_and_saves_its_own_state_dict():
    from pipeline.training.supervised import Supervised, checkpoint_weights, trainable_engine

    model = build_model("seed_cnn_bn")
    engine = trainable_engine("source", model, torch.zeros(1, 1, 28, 28), None)
    assert isinstance(engine, Supervised) and engine.model is model
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8) % 10
    loss, logits, aux = engine.joint_loss(x, y)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(model(x), y)) and aux == 0
    assert checkpoint_weights("source", engine).keys() == model.state_dict().keys()
