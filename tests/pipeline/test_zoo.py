"""The zoo's real architectures: each builds, trains a step and adapts a step with TTT and IT3;
default layers pass each engine's dry run; published layouts (the TTT release's ResNetCifar,
RobustBench's WideResNet, torchvision's ResNets) load their state_dicts without renaming;
`import-model` turns such files into checkpoints (or fails in one line, writing nothing)."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import torchvision

import engines
from pipeline.checkpoint import (build_engine_from_checkpoint, build_model_from_checkpoint,
                                 load_checkpoint)
from pipeline.datasets import get_dataset
from pipeline.errors import TTTPipeError
from pipeline.model_import import import_model
from pipeline.models import build_model, default_layer, list_models, model_kwargs_for
from pipeline.models.wide_resnet import WideResNet

CIFAR = get_dataset("cifar10")
# The split, channels_last and rotation-fold machinery has its own tests (tests/engines); here
# it is off so a step on a 25M-parameter net stays cheap on a loaded 2-core machine.
LITE = {"split_model": False, "channels_last": False}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: on a busy 2-core machine, two OpenMP threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(method: str, layer: str, lite: bool) -> dict:
    extra = {**LITE, **({"fold_rotations": False} if method == "ttt" else {})} if lite else {}
    # ungated: the test checks that the step changes the prediction; on an untrained model
    # TTT's default entropy gate may keep step 0 everywhere (the gate has its own tests)
    return {"layer": layer, "gate": "none", **extra}


def _randomise_norm_stats(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """BatchNorm running stats and affine weights away from their init, so loads are visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(1 + 0.1 * torch.rand(m.running_var.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def wrn():
    torch.manual_seed(0)
    return _randomise_norm_stats(build_model("wrn28_10", **model_kwargs_for("wrn28_10", CIFAR)))


# (what, model factory, input shape, {method: layer} override or None for the zoo's default, lite)
STEP_CASES = [
    ("seed_cnn", lambda: build_model("seed_cnn"), (1, 28, 28), None, False),
    ("seed_rescnn", lambda: build_model("seed_rescnn"), (1, 28, 28), None, False),
    ("seed_cnn_bn", lambda: build_model("seed_cnn_bn"), (1, 28, 28), None, False),
    ("seed_cnn-rgb", lambda: build_model("seed_cnn", **model_kwargs_for("seed_cnn", CIFAR)), (3, 32, 32), None, False),
    ("resnet26-group", lambda: build_model("resnet26", **model_kwargs_for("resnet26", CIFAR)), (3, 32, 32), None, False),
    ("resnet26-batch", lambda: build_model("resnet26", norm="batch"), (3, 32, 32), None, True),
    # wrn28_10 takes ~25 s a step here: the same class at depth 10, width 2 (its dry runs at
    # full size are below)
    ("wrn-10-2", lambda: WideResNet(depth=10, widen_factor=2), (3, 32, 32), {"ttt": "block2", "it3": "block1"}, True),
    # the ImageNet nets at 32x32: layer1's 8x8 maps (layer2, their default, needs >= 5x5 for
    # TTT's conv head: 64x64 and up; checked in the dry-run test below)
    ("resnet18", lambda: build_model("resnet18", num_classes=10), (3, 32, 32), {"ttt": "layer1", "it3": "layer1"}, True),
    ("resnet50", lambda: build_model("resnet50", num_classes=10), (3, 32, 32), {"ttt": "layer1", "it3": "layer1"}, True),
]


@pytest.mark.parametrize("what, factory, shape, layers, lite", STEP_CASES, ids=[c[0] for c in STEP_CASES])
@pytest.mark.parametrize("method", ["ttt", "it3"])
def test_every_zoo_model_trains_a_step_and_adapts_a_step(what, factory, shape, layers, lite, method):
    torch.manual_seed(0)
    model = factory()
    name = what.split("-")[0]
    layer = layers[method] if layers else default_layer(name, method)
    x = torch.rand(2, *shape)
    engine = engines.get_engine(method)(model, x[:1], _config(method, layer, lite))
    optimizer = torch.optim.Adam(engine.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in engine.state_dict().items()}
    engine.train()
    loss, logits, aux = engine.joint_loss(x, torch.tensor([0, 1]))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and logits.shape == (2, 10)
    changed = {k.split(".")[0] for k, v in engine.state_dict().items() if not torch.equal(v, before[k])}
    assert "model" in changed and changed & {"head", "embedder"}  # both parts trained
    engine.eval()
    result = engine.adapt(x, steps=1)
    assert result.logits.shape == (2, 2, 10) and torch.isfinite(result.logits).all()
    assert not torch.equal(result.logits[0], result.logits[1])  # the step changed the prediction


DRY_RUN_SHAPES = {"seed_cnn": (1, 28, 28), "seed_rescnn": (1, 28, 28), "seed_cnn_bn": (1, 28, 28),
                  "resnet26": (3, 32, 32), "wrn28_10": (3, 32, 32), "resnet18": (3, 64, 64),
                  "resnet50": (3, 64, 64)}


def test_dry_run_shapes_cover_the_zoo():
    assert sorted(DRY_RUN_SHAPES) == list_models()


@pytest.mark.parametrize("name", sorted(DRY_RUN_SHAPES))
def test_default_layers_pass_each_engines_dry_run(name, wrn):
    model = wrn if name == "wrn28_10" else build_model(name, num_classes=10)
    example = torch.rand(1, *DRY_RUN_SHAPES[name])
    for method in ("ttt", "it3"):
        layer = default_layer(name, method)
        engine = engines.get_engine(method)(model, example, _config(method, layer, lite=True))
        assert engine.layer_name == layer
        if name not in ("wrn28_10", "resnet50"):  # their dry run was the forward; spare a second
            assert engine.predict(example).shape == (1, 10)


def test_resnet26_has_the_ttt_releases_layout():
    gn, bn = build_model("resnet26"), build_model("resnet26", norm="batch")
    keys = list(gn.state_dict())
    # ResNetCifar(26): conv1, 3 stages x 4 blocks x (bn1, conv1, bn2, conv2), bn, fc
    assert keys[:3] == ["conv1.weight", "layer1.0.bn1.weight", "layer1.0.bn1.bias"]
    assert "layer3.3.conv2.weight" in keys and "layer1.4.conv1.weight" not in keys
    assert keys[-4:] == ["bn.weight", "bn.bias", "fc.weight", "fc.bias"]
    assert len(keys) == 1 + 12 * 6 + 2 + 2  # GroupNorm: weight and bias only
    assert isinstance(gn.layer1[0].bn1, torch.nn.GroupNorm) and gn.layer1[0].bn1.num_groups == 8
    assert len(bn.state_dict()) == 1 + 12 * 12 + 5 + 2  # BatchNorm adds running stats
    assert tuple(gn.layer2[0].conv1.weight.shape) == (32, 16, 3, 3)
    assert sum(p.numel() for p in gn.parameters()) == 366_938  # ResNet-26, width 1 (0.37M)
    x = torch.rand(2, 3, 32, 32)
    assert gn(x).shape == (2, 10)


def robustbench_wrn_keys(depth: int = 28) -> list[str]:
    """The state_dict keys of RobustBench's WideResNet(depth, widen_factor=10) ("Standard"),
    in order, as its architectures/wide_resnet.py defines them."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight"]
    for b in (1, 2, 3):
        for i in range((depth - 4) // 6):
            p = f"block{b}.layer.{i}."
            keys += [p + "bn1." + k for k in bn] + [p + "conv1.weight"]
            keys += [p + "bn2." + k for k in bn] + [p + "conv2.weight"]
            if i == 0:  # 16->160, 160->320, 320->640: every first block changes the width
                keys.append(p + "convShortcut.weight")
    return keys + ["bn1." + k for k in bn] + ["fc.weight", "fc.bias"]


def test_wrn28_10_has_robustbenchs_keys_in_order(wrn):
    sd = wrn.state_dict()
    assert list(sd) == robustbench_wrn_keys() and len(sd) == 155
    assert tuple(sd["block1.layer.0.conv1.weight"].shape) == (160, 16, 3, 3)
    assert tuple(sd["block3.layer.0.convShortcut.weight"].shape) == (640, 320, 1, 1)
    assert tuple(sd["fc.weight"].shape) == (10, 640)
    assert sum(p.numel() for p in wrn.parameters()) == 36_479_194  # WRN-28-10's 36.5M


def test_robustbench_checkpoint_with_module_prefix_imports_to_identical_logits(wrn, tmp_path):
    # RobustBench's files: {"state_dict": {"module.<key>": ...}} from DataParallel training
    file = tmp_path / "Standard.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in wrn.state_dict().items()}, "epoch": 200}, file)
    out = tmp_path / "ckpt"
    manifest = import_model("wrn28_10", str(file), "cifar10", str(out))
    assert manifest["method"]["name"] == "source" and manifest["model"]["normalize"] == "none"
    assert manifest["model"]["kwargs"]["mean"] == 0.0 and manifest["dataset"]["name"] == "cifar10"
    assert manifest["training"]["stripped_prefix"] == "module." and manifest["training"]["unwrapped"] == '["state_dict"]'
    loaded = build_model_from_checkpoint(load_checkpoint(str(out))).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), wrn(x))  # [0, 1] input, no normalisation, same weights


def test_torchvision_state_dict_imports_and_normalises_as_torchvision(tmp_path):
    torch.manual_seed(0)
    tv = _randomise_norm_stats(torchvision.models.resnet18(weights=None, num_classes=10))
    file = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), file)
    manifest = import_model("resnet18", str(file), "cifar10", str(tmp_path / "ckpt"))
    assert manifest["model"]["normalize"] == "imagenet"
    ours = build_model_from_checkpoint(load_checkpoint(str(tmp_path / "ckpt"))).eval()
    x = torch.rand(2, 3, 64, 64)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.equal(ours(x), tv((x - mean) / std))
    assert list(build_model("resnet50").state_dict()) == list(torchvision.models.resnet50(weights=None).state_dict())


def test_import_model_normalize_choice_is_recorded_and_applied(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet26", **model_kwargs_for("resnet26", CIFAR, "none"))
    file = tmp_path / "r26.pt"
    torch.save({"net": model.state_dict()}, file)
    m = import_model("resnet26", str(file), "cifar10", str(tmp_path / "ck"), normalize="0.5,0.25")
    assert m["model"]["normalize"] == "0.5,0.25" and m["model"]["kwargs"]["mean"] == 0.5
    loaded = build_model_from_checkpoint(load_checkpoint(str(tmp_path / "ck"))).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()((x - 0.5) / 0.25))  # the model itself: none


def test_a_source_checkpoint_has_no_engine_until_its_part_is_trained(tmp_path):
    file = tmp_path / "w.pt"
    torch.save(build_model("seed_cnn").state_dict(), file)
    import_model("seed_cnn", str(file), "mnist", str(tmp_path / "ck"))
    ckpt = load_checkpoint(str(tmp_path / "ck"))
    with pytest.raises(TTTPipeError, match="source model .* --init .* --train aux"):
        build_engine_from_checkpoint(ckpt)
    with pytest.raises(TTTPipeError, match="source model"):
        load_checkpoint(str(tmp_path / "ck"), expect_method="ttt")
    with pytest.raises(TTTPipeError, match="auxiliary part .*needs training"):
        import_model("seed_cnn", str(file), "mnist", str(tmp_path / "ck2"), method="ttt")
    assert not (tmp_path / "ck2").exists()


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, (f"touch {_Evil.marker}",))


def _bad_weights(kind: str, tmp_path):
    file = tmp_path / f"{kind}.pt"
    _Evil.marker = str(tmp_path / "PWNED")
    if kind == "pickle-with-code":
        with open(file, "wb") as f:
            pickle.dump({"state_dict": {"conv1.weight": _Evil()}}, f, protocol=4)
    elif kind == "torch-save-with-code":
        torch.save({"state_dict": {"conv1.weight": _Evil()}}, file)
    elif kind == "torch-save-of-a-module":
        torch.save(build_model("resnet26"), file)  # the whole module pickled: code references
    elif kind == "other-architecture":
        torch.save(torchvision.models.resnet18(weights=None, num_classes=10).state_dict(), file)
    elif kind == "other-num-classes":
        torch.save(build_model("resnet26", num_classes=100).state_dict(), file)
    elif kind == "not-a-state-dict":
        torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, file)
    elif kind == "garbage":
        file.write_bytes(b"not a torch file at all")
    return file


@pytest.mark.parametrize("kind, words", [
    ("pickle-with-code", "GLOBAL (posix|os).system.*loading them would run code"),
    ("torch-save-with-code", "(posix|os).system.*loading them would run code"),
    ("torch-save-of-a-module", "loading them would run code"),
    ("other-architecture", "do not fit model resnet26: .*missing \\(conv1.weight|missing"),
    ("other-num-classes", "shape mismatch.*fc.weight is \\(100, 64\\)"),
    ("not-a-state-dict", "hold no state_dict"),
    ("garbage", "cannot load weights .*not a torch.save file"),
])
def test_bad_weights_are_one_line_errors_and_write_nothing(kind, words, tmp_path):
    file = _bad_weights(kind, tmp_path)
    out = tmp_path / "ckpt"
    with pytest.raises(TTTPipeError, match=words) as info:
        import_model("resnet26", str(file), "cifar10", str(out))
    assert "\n" not in str(info.value)
    assert not out.exists() and not (tmp_path / "PWNED").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt")]  # no temp dirs


def test_other_architecture_lists_a_few_keys_and_the_counts(tmp_path):
    file = _bad_weights("other-architecture", tmp_path)
    with pytest.raises(TTTPipeError) as info:
        import_model("resnet26", str(file), "cifar10", str(tmp_path / "ck"))
    msg = str(info.value)
    assert "missing (" in msg and "unexpected (" in msg and ", ..." in msg
    assert "of 77 keys" in msg  # resnet26 (GroupNorm) has 77


def test_unknown_model_dataset_and_rgb_model_on_grayscale_are_refused(tmp_path):
    file = tmp_path / "w.pt"
    torch.save(build_model("seed_cnn").state_dict(), file)
    for model, dataset, words in (("resnet27", "cifar10", "unknown model 'resnet27'"),
                                  ("resnet26", "mnst", "unknown dataset|mnst"),
                                  ("wrn28_10", "mnist", "takes RGB images"),
                                  ("seed_cnn", "mnist", None)):
        if words is None:
            import_model(model, str(file), dataset, str(tmp_path / "ok"))
            continue
        with pytest.raises(TTTPipeError, match=words):
            import_model(model, str(file), dataset, str(tmp_path / "ck"))
    assert not (tmp_path / "ck").exists()
    manifest = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    assert manifest["model"] == {"name": "seed_cnn", "normalize": "dataset", "kwargs": {
        "mean": 0.1307, "std": 0.3081, "num_classes": 10, "in_channels": 1, "image_size": [28, 28]}}
