"""`ttt-pipe train --init CKPT --train aux|all` on the shared local Ray: aux-only training leaves
the model (weights and BatchNorm statistics) bit-identical and trains the head/embedder; `all`
changes both; the manifest records the init; a killed --init run resumes bit-identically;
options the checkpoint fixes are one-line errors that write nothing."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import engines
from jobs.cli import app
from jobs.train import KILL_ENV, resolve_spec
from pipeline.checkpoint import build_engine_from_checkpoint, load_checkpoint, model_state_dict
from pipeline.errors import TTTPipeError
from pipeline.models import build_model

pytestmark = pytest.mark.ray

SMALL = ("--limit", "64", "--batch-size", "16")


@pytest.fixture(scope="module")
def source(idx_dir, tmp_path_factory):
    """A `source` checkpoint (import-model) of seed_cnn_bn whose BatchNorm statistics are not
    the defaults (a few train-mode forwards), so an update of them would show."""
    root = tmp_path_factory.mktemp("source")
    torch.manual_seed(3)
    net = build_model("seed_cnn_bn", mean=0.1307, std=0.3081)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(8, 1, 28, 28))
    torch.save(net.state_dict(), root / "net.pt")
    out = root / "ckpt"
    result = CliRunner().invoke(app, ["import-model", "--model", "seed_cnn_bn", "--weights",
                                      str(root / "net.pt"), "--dataset", "mnist", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _train(idx_dir, out, *extra: str, method: str = "ttt"):
    args = ["train", "--method", method, "--data-dir", str(idx_dir / "mnist"), "--out", str(out),
            *SMALL, *extra]
    return CliRunner().invoke(app, args)


def _weights(out) -> dict[str, torch.Tensor]:
    return torch.load(out / "weights.pt", weights_only=True)


def _fresh_aux(ckpt_uri, method: str) -> dict[str, torch.Tensor]:
    """The auxiliary part as the trainer builds it before training (seeded by config.seed)."""
    ckpt = load_checkpoint(str(ckpt_uri), expect_method=method)
    model = build_model(ckpt.model_name, **ckpt.manifest["model"]["kwargs"])
    fresh = engines.get_engine(method)(model, torch.zeros(1, 1, 28, 28), ckpt.manifest["method"]["config"])
    return {k: v for k, v in fresh.state_dict().items() if not k.startswith("model.")}


@pytest.fixture(scope="module")
def runs(ray_local, idx_dir, source, tmp_path_factory):
    root = tmp_path_factory.mktemp("init")
    out = {}
    for method, scope, epochs in (("ttt", "aux", "2"), ("ttt", "all", "1"), ("it3", "aux", "1")):
        path = root / f"{method}-{scope}"
        result = _train(idx_dir, path, "--init", str(source), "--train", scope,
                        "--epochs", epochs, method=method)
        assert result.exit_code == 0, result.output
        out[method, scope] = (path, result)
    return out


@pytest.mark.parametrize("method", ["ttt", "it3"])
def test_aux_leaves_the_model_bit_identical_and_trains_the_aux_part(runs, source, method):
    path, result = runs[method, "aux"]
    assert "model frozen" in result.output
    src = model_state_dict(load_checkpoint(str(source)))
    got = _weights(path)
    model = {k[len("model."):]: v for k, v in got.items() if k.startswith("model.")}
    assert model.keys() == src.keys()
    assert any("running_mean" in k for k in src)  # BN statistics are part of what is compared
    assert all(torch.equal(model[k], src[k]) for k in src), [k for k in src if not torch.equal(model[k], src[k])]
    aux = _fresh_aux(path, method)
    assert aux and all(k in got for k in aux)
    assert all(not torch.equal(got[k], aux[k]) for k in aux if k.endswith("weight"))
    build_engine_from_checkpoint(load_checkpoint(str(path), expect_method=method))  # adaptable


def test_all_changes_model_and_aux_part(runs, source):
    method = "ttt"
    path, result = runs[method, "all"]
    assert "model and auxiliary part" in result.output
    src = model_state_dict(load_checkpoint(str(source)))
    got = _weights(path)
    changed = {k for k in src if not torch.equal(got[f"model.{k}"], src[k])}
    assert any(k.endswith("weight") for k in changed)
    assert any("running_mean" in k for k in changed)  # BN in train mode: statistics move
    aux = _fresh_aux(path, method)
    assert any(not torch.equal(got[k], aux[k]) for k in aux)


@pytest.mark.parametrize("scope", ["aux", "all"])
def test_manifest_records_init_and_scope(runs, source, scope):
    path, _ = runs["ttt", scope]
    manifest = json.loads((path / "manifest.json").read_text())
    src = json.loads((source / "manifest.json").read_text())
    assert manifest["training"]["train"] == scope
    assert manifest["training"]["init"] == {"uri": str(source), "weights_sha256": src["weights_sha256"],
                                            "method": "source"}
    assert manifest["model"] == src["model"]  # name, kwargs and normalisation from the init
    assert manifest["dataset"] == src["dataset"]


def test_killed_init_run_resumes_bit_identically(runs, idx_dir, source, tmp_path, monkeypatch):
    whole, _ = runs["ttt", "aux"]  # 2 epochs, uninterrupted
    out = tmp_path / "ckpt"
    args = ("--init", str(source), "--train", "aux", "--epochs", "2")
    monkeypatch.setenv(KILL_ENV, str(tmp_path / "killed-once"))
    first = _train(idx_dir, out, *args)
    assert first.exit_code == 1 and "the trainer actor died" in first.output, first.output
    assert not out.exists() and (tmp_path / "ckpt.train-state" / "state.pt").is_file()
    changed = _train(idx_dir, out, "--init", str(source), "--train", "all", "--epochs", "2")
    assert changed.exit_code == 1 and "other settings" in changed.output  # the scope is part of it
    second = _train(idx_dir, out, *args)
    assert second.exit_code == 0, second.output
    assert "resuming after epoch 1/2" in second.output
    a, b = _weights(whole), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    training = json.loads((out / "manifest.json").read_text())["training"]
    assert training["resumed_from_epoch"] == 1 and training["train"] == "aux"


@pytest.mark.parametrize("extra, words", [
    (("--model", "seed_cnn"), "drop --model"),
    (("--dataset", "mnist"), "drop --dataset"),
    (("--model-kwargs", '{"norm": "batch"}'), "drop --model-kwargs"),
    (("--normalize", "none"), "drop --normalize"),
    (("--image-size", "28"), "drop --image-size"),
])
def test_options_the_init_fixes_are_one_line_errors(idx_dir, source, tmp_path, extra, words):
    out = tmp_path / "ckpt"
    result = _train(idx_dir, out, "--init", str(source), "--train", "aux", *extra)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], result.output
    assert not out.exists() and not (tmp_path / "ckpt.train-state").exists()


def test_bad_init_and_scope_are_one_line_errors(idx_dir, tmp_path):
    with pytest.raises(TTTPipeError, match="pass --init CKPT"):
        resolve_spec("ttt", "mnist", str(tmp_path / "a"), train="aux")
    with pytest.raises(TTTPipeError, match="no checkpoint at"):
        resolve_spec("ttt", None, str(tmp_path / "a"), init=str(tmp_path / "missing"), train="aux")
    with pytest.raises(TTTPipeError, match="--dataset is missing"):
        resolve_spec("ttt", None, str(tmp_path / "a"))
    result = _train(idx_dir, tmp_path / "b", "--dataset", "mnist", "--train", "most")
    assert result.exit_code != 0 and not (tmp_path / "b").exists()


def test_init_onto_itself_is_refused(source):
    before = (source / "manifest.json").read_bytes()
    with pytest.raises(TTTPipeError, match="is the --init checkpoint itself") as e:
        resolve_spec("ttt", None, str(source) + "/", init=str(source), train="aux")
    assert "\n" not in str(e.value) and (source / "manifest.json").read_bytes() == before


def test_changed_init_is_refused_by_the_trainer(source, tmp_path):
    """The actor re-reads the init and refuses weights other than the ones the run planned with."""
    from pipeline.training import load_init_model

    sha = json.loads((source / "manifest.json").read_text())["weights_sha256"]
    model, ckpt = load_init_model(str(source), sha)
    assert ckpt.method == "source" and isinstance(model, torch.nn.Module)
    with pytest.raises(TTTPipeError, match="changed since this run started"):
        load_init_model(str(source), "0" * 64)


def test_folder_init_takes_its_size_and_needs_its_folder(tmp_path):
    """A folder checkpoint's manifest names the folder's identity, not its path: --dataset
    folder:PATH is required, must be that folder, and the image size comes from the checkpoint."""
    from rgb_helpers import write_folder

    folder = write_folder(tmp_path / "pets", per_class=(2, 2), size=(20, 20))
    other = write_folder(tmp_path / "cars", classes=("bus", "van", "car"), per_class=2, size=(20, 20))
    torch.save(build_model("seed_cnn", in_channels=3, image_size=16, num_classes=2).state_dict(), tmp_path / "w.pt")
    ckpt = tmp_path / "src"
    result = CliRunner().invoke(app, ["import-model", "--model", "seed_cnn", "--weights", str(tmp_path / "w.pt"),
                                      "--dataset", f"folder:{folder}", "--image-size", "16", "--out", str(ckpt)])
    assert result.exit_code == 0, result.output
    with pytest.raises(TTTPipeError, match="pass --dataset folder:PATH"):
        resolve_spec("ttt", None, str(tmp_path / "a"), init=str(ckpt), train="aux")
    with pytest.raises(TTTPipeError, match="pass that folder"):
        resolve_spec("ttt", f"folder:{other}", str(tmp_path / "a"), init=str(ckpt), train="aux")
    spec = resolve_spec("ttt", f"folder:{folder}", str(tmp_path / "a"), init=str(ckpt), train="aux")
    assert spec.image_size == 16 and spec.dataset == f"folder:{folder}" and spec.train_scope == "aux"
    assert spec.init["uri"] == str(ckpt) and spec.init["method"] == "source"
