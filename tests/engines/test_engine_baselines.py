"""What each fully test-time method promises beyond the shared contract (tests that fail if the
method is not the paper's): test-batch statistics in eval mode, EATA's filters and Fisher
penalty, SAR's recovery, MEMO on BatchNorm, CoTTA's restore and teacher, LAME's reduction."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from engine_helpers import TinyNet, make_tiny_engine, rgb_batch
from torch import nn

import engines
from engines.augment import augmix, cotta_augment
from engines.tta import batch_statistics, softmax_entropy

BASELINES = [n for n in engines.list_engines() if not engines.get_engine(n).needs_joint_training]


def _source_with_batch_stats(model: nn.Module) -> nn.Module:
    """Tent's official configure_model on a copy: BN with track_running_stats off, no running
    statistics, eval mode — the reference for 'uses the test batch's statistics'."""
    ref = copy.deepcopy(model).eval()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    return ref


def _params(engine):
    return {n: p.detach().clone() for n, p in engine.adapted_parameters()}


@pytest.mark.parametrize("name", ["norm", "tent"])
def test_eval_mode_uses_the_test_batch_statistics(name):
    engine = make_tiny_engine(name).eval()
    x = rgb_batch(8, seed=1, shift=0.3)  # shifted away from the (default) running stats
    with torch.no_grad():
        source = engine.model(x)
        reference = _source_with_batch_stats(engine.model)(x)
    result = engine.adapt(x, steps=1, mode="episodic")
    assert not torch.allclose(result.logits[0], source, atol=1e-3)
    torch.testing.assert_close(result.logits[0], reference, atol=1e-5, rtol=1e-5)
    assert engine.model.norm1.running_mean.abs().sum() == 0  # running stats untouched
    assert all("forward" not in m.__dict__ for m in engine.model.modules())


def test_norm_prior_mixes_source_and_batch_statistics():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    bn.running_mean.fill_(0.2)
    bn.running_var.fill_(2.0)
    model = nn.Sequential(bn, nn.Flatten(), nn.Linear(3 * 16 * 16, 10)).eval()
    x = rgb_batch(8, seed=2)
    out = {p: engines.NormEngine(model, x[:1], engines.NormConfig(bn_prior=p)).adapt(x, 0)
           .logits[0] for p in (0.0, 0.25, 1.0)}
    with torch.no_grad():
        torch.testing.assert_close(out[1.0], model(x))  # prior 1 = the source model
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True)
        m, v = 0.25 * bn.running_mean + 0.75 * mean, 0.25 * bn.running_var + 0.75 * var
        h = (x - m[None, :, None, None]) / (v[None, :, None, None] + bn.eps).sqrt()
        torch.testing.assert_close(out[0.25], model[2](h.flatten(1)), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[0.0], out[0.25])


def test_batch_statistics_in_train_mode_leaves_running_stats():
    model = TinyNet("batch").train()
    with batch_statistics(model):
        model(rgb_batch(4))
    assert model.norm1.num_batches_tracked == 0 and model.norm1.running_mean.abs().sum() == 0


@pytest.mark.parametrize("name", ["eata", "sar"])
@pytest.mark.parametrize("classes", [10, 100])
def test_entropy_thresholds_use_ln_c(name, classes):
    cls = engines.get_engine(name)
    engine = cls(TinyNet(num_classes=classes), rgb_batch(2), cls.config_cls())
    assert engine.e0 == pytest.approx(0.4 * math.log(classes))


def test_eata_skips_uncertain_samples_and_filters_redundant_ones():
    x = rgb_batch(8, seed=3, shift=0.2)
    unsure = make_tiny_engine("eata")
    unsure.model.scale = 0.5  # near-uniform predictions: every entropy > 0.4 ln 10
    before = _params(unsure)
    unsure.adapt(x, steps=3, mode="online")
    assert all(torch.equal(before[n], p) for n, p in _params(unsure).items())
    assert not unsure.method_state.has_probs

    sure = make_tiny_engine("eata", mode="online")
    with torch.no_grad(), batch_statistics(sure.model):
        assert (softmax_entropy(sure.model(x)) < sure.e0).any()
    sure.adapt(x, steps=1)
    after_one = _params(sure)
    assert any(not torch.equal(before[n], p) for n, p in after_one.items())
    assert sure.method_state.has_probs
    # the same batch again: every sample's prediction is like the moving average (cos > 0.05)
    sure.adapt(x, steps=1)
    assert all(torch.equal(after_one[n], p) for n, p in _params(sure).items())


def test_eata_fisher_penalty_from_clean_batches():
    engine = make_tiny_engine("eata", mode="online", d_margin=1.0)
    with pytest.raises(ValueError, match="compute_fisher got no batch"):
        engine.compute_fisher([])
    assert engine.compute_fisher([rgb_batch(8, seed=s) for s in range(3)]) == 3
    fisher = dict(engine.fisher.named_buffers())
    assert len(fisher) == 2 * len(engine.adapted_parameters())
    assert all(v.abs().sum() > 0 for k, v in fisher.items() if k.endswith("__fisher"))
    assert engine._penalty() == 0
    plain = make_tiny_engine("eata", mode="online", d_margin=1.0)
    x = rgb_batch(8, seed=4, shift=0.2)
    a, b = engine.adapt(x, steps=3), plain.adapt(x, steps=3)
    assert float(engine._penalty().detach()) > 0
    assert a.losses[0] == b.losses[0] and a.losses[-1] > b.losses[-1]  # the penalty is added
    assert "fisher.model__norm1__weight__fisher" in engine.state_dict()


def test_sar_recovers_on_collapse():
    x = rgb_batch(8, seed=5, shift=0.2)
    engine = make_tiny_engine("sar", mode="online", reset_em=100.0)  # any EMA "collapsed"
    before = _params(engine)
    engine.adapt(x, steps=1, lr=0.1)
    assert int(engine.method_state.resets) == 1 and float(engine.method_state.ema) == -1
    assert all(torch.equal(before[n], p) for n, p in _params(engine).items())
    assert all(not opt.state for opt in engine._optimizers.values())
    normal = make_tiny_engine("sar", mode="online")
    normal.adapt(x, steps=1, lr=0.1)
    assert int(normal.method_state.resets) == 0 and 0 < float(normal.method_state.ema)
    assert any(not torch.equal(before[n], p) for n, p in _params(normal).items())


def test_sar_skips_the_top_layers_by_name():
    model = nn.Sequential()
    model.add_module("layer1", nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)))
    model.add_module("layer4", nn.Sequential(nn.Conv2d(4, 4, 3), nn.GroupNorm(2, 4)))
    model.add_module("head", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                           nn.Linear(4, 10)))
    names = [n for n, _ in engines.SAREngine(model, rgb_batch(2)).adapted_parameters()]
    assert names == ["model.layer1.1.weight", "model.layer1.1.bias"]
    every = engines.SAREngine(model, rgb_batch(2), engines.SARConfig(skip=""))
    assert len(every.adapted_parameters()) == 4


def test_memo_runs_on_a_bn_model_sample_by_sample():
    engine = make_tiny_engine("memo", "batch")  # BatchNorm, eval mode, single samples
    x = rgb_batch(4, seed=6, shift=0.2)
    result = engine.adapt(x, steps=1)
    assert result.logits.shape == (2, 4, 10) and torch.isfinite(result.logits).all()
    alone = engine.adapt(x[2:3], steps=1)  # episodic per sample: the others do not matter
    torch.testing.assert_close(alone.logits[:, 0], result.logits[:, 2], atol=1e-6, rtol=0)
    assert not torch.equal(result.logits[0], result.logits[1])


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 17, 23), (3, 8, 8)])
def test_augmentations_any_shape_seeded_in_range(shape):
    image = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    views = [augmix(image, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert all(v.shape == image.shape and 0 <= v.min() and v.max() <= 1 for v in views)
    assert torch.equal(views[0], views[1]) and not torch.equal(views[0], views[2])
    batch = image[None].repeat(2, 1, 1, 1)
    out = cotta_augment(batch, torch.Generator().manual_seed(3))
    assert out.shape == batch.shape and 0 <= out.min() and out.max() <= 1
    assert torch.equal(out, cotta_augment(batch, torch.Generator().manual_seed(3)))


def test_cotta_restore_probability_and_teacher_ema():
    x = rgb_batch(8, seed=7, shift=0.2)
    source = {n: p.detach().clone() for n, p in make_tiny_engine("cotta").model.named_parameters()}
    moved = {}
    for rst in (0.0, 0.01, 1.0):
        engine = make_tiny_engine("cotta", mode="online", rst=rst)
        engine.adapt(x, steps=1, lr=1e-2)
        moved[rst] = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
        if rst == 0.0:
            teacher = engine._weights(engine.method_state, "teacher")
            for n, p in moved[0.0].items():  # teacher = 0.999 source + 0.001 student
                torch.testing.assert_close(teacher[n], 0.999 * source[n] + 0.001 * p)
    assert all(torch.equal(moved[1.0][n], source[n]) for n in source)
    changed = torch.cat([(moved[0.0][n] != source[n]).flatten() for n in source])
    restored = torch.cat([(moved[0.01][n] == source[n]).flatten() for n in source])
    frac = float(restored[changed].float().mean())
    assert changed.sum() > 1000 and 0.003 < frac < 0.025


def test_cotta_averages_augmentations_only_when_unsure():
    x = rgb_batch(8, seed=8, shift=0.2)
    never = make_tiny_engine("cotta", ap=0.0).adapt(x, steps=0).logits[0]
    always = make_tiny_engine("cotta", ap=1.0).adapt(x, steps=0).logits[0]
    plain = _source_with_batch_stats(make_tiny_engine("cotta").model)
    with torch.no_grad():
        torch.testing.assert_close(never, plain(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(always, never, atol=1e-3)
    assert engines.cotta.default_ap(10) == 0.92 and engines.cotta.default_ap(1000) == 0.1


def test_lame_with_zero_affinity_is_the_source_prediction():
    x = rgb_batch(8, seed=9, shift=0.2)
    zero = make_tiny_engine("lame", knn=0).adapt(x, steps=1).logits
    torch.testing.assert_close(zero[1].softmax(1), zero[0].softmax(1), atol=1e-6, rtol=0)
    assert torch.equal(zero[1].argmax(1), zero[0].argmax(1))
    knn = make_tiny_engine("lame").adapt(x, steps=1).logits
    assert not torch.allclose(knn[1].softmax(1), knn[0].softmax(1), atol=1e-3)


def test_lame_smooths_predictions_within_a_feature_cluster():
    from engines.lame import affinity, laplacian_adjust
    feats = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.98, -0.1],     # cluster A
                          [0.0, 1.0], [0.1, 0.99], [-0.1, 0.98]])    # cluster B
    p = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6],           # row 2: A's outlier
                      [0.2, 0.8], [0.3, 0.7], [0.1, 0.9]])
    kernel = affinity(torch.nn.functional.normalize(feats, dim=-1), "knn", 2)
    y = laplacian_adjust(p, -p.log(), kernel, 1.0, 100)
    assert y.argmax(1).tolist() == [0, 0, 0, 1, 1, 1]
    torch.testing.assert_close(laplacian_adjust(p, -p.log(), torch.zeros(6, 6), 1.0, 100), p)


@pytest.mark.parametrize("name", BASELINES)
def test_no_joint_training_no_layer(name):
    cls = engines.get_engine(name)
    assert not cls.needs_joint_training and cls.config_cls().layer == ""
    engine = make_tiny_engine(name)
    with pytest.raises(ValueError, match=f"{name} has no auxiliary part to train; .*--method "
                                         f"source") as e:
        engine.joint_loss(rgb_batch(2), torch.zeros(2, dtype=torch.long))
    assert "\n" not in str(e.value)
    assert not [n for n, _ in engine.named_parameters() if not n.startswith("model.")]


def test_config_errors_are_one_line():
    for bad in (lambda: engines.NormConfig(adapt_params="norm"),
                lambda: engines.TentConfig(bn_prior=2.0),
                lambda: engines.LAMEConfig(affinity="gauss"),
                lambda: engines.CoTTAConfig(ap=3.0)):
        with pytest.raises(ValueError) as e:
            bad()
        assert "\n" not in str(e.value)


def test_source_engine_is_the_model_as_trained():
    engine = make_tiny_engine("source").train()  # even in train mode: the running statistics
    x = rgb_batch(8, seed=10, shift=0.3)
    result = engine.adapt(x, steps=2)
    engine.model.eval()
    with torch.no_grad():
        source = engine.model(x)
    for k in range(3):  # channels_last convs inside adapt() round differently
        torch.testing.assert_close(result.logits[k], source, atol=1e-5, rtol=1e-5)


def test_cotta_set_source_after_loading_weights():
    engine = make_tiny_engine("cotta", mode="online")
    torch.manual_seed(42)
    trained = TinyNet("batch")
    engine.model.load_state_dict(trained.state_dict())
    engine.set_source()
    x = rgb_batch(8, seed=11, shift=0.2)
    with torch.no_grad():
        expected = _source_with_batch_stats(trained)(x)
    torch.testing.assert_close(engine.predict(x), expected, atol=1e-5, rtol=1e-5)


def test_batchnorm1d_on_one_sample_falls_back_to_running_statistics():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 8), nn.BatchNorm1d(8),
                          nn.Linear(8, 10)).eval()
    x = rgb_batch(1, seed=12)
    with torch.no_grad():
        source = model(x)
        for prior in (0.0, 0.5):
            with batch_statistics(model, prior):
                torch.testing.assert_close(model(x), source)
        with batch_statistics(model):
            assert not torch.allclose(model(rgb_batch(4, seed=12))[:1], source)


def test_sar_step_is_sharpness_aware():
    x = rgb_batch(8, seed=13, shift=0.2)
    flat = make_tiny_engine("sar", "group", mode="online", rho=0.0)
    params = [p for _, p in flat.adapted_parameters()]
    ent = softmax_entropy(flat.model(x))
    keep = ent < flat.e0
    assert keep.any()
    grads = torch.autograd.grad(ent[keep].mean(), params)
    expected = [p.detach() - 0.01 * g for p, g in zip(params, grads)]  # SGD's first step
    flat.adapt(x, steps=1, lr=0.01)
    for p, e in zip(params, expected):  # rho 0: a plain step on the reliable samples
        torch.testing.assert_close(p.detach(), e, atol=1e-6, rtol=1e-6)
    sam = make_tiny_engine("sar", "group", mode="online")
    sam.adapt(x, steps=1, lr=0.01)
    assert any(not torch.allclose(p, e, atol=1e-6) for (_, p), e in
               zip(sam.adapted_parameters(), expected))


@pytest.mark.parametrize("name", ["tent", "sar", "lame"])
def test_adapt_episodes_equals_episodic_adapts(name):
    engine = make_tiny_engine(name)
    xs = torch.stack([rgb_batch(8, seed=s, shift=0.2) for s in (14, 15)])
    result = engine.adapt_episodes(xs, steps=2, lr=1e-2)
    assert result.logits.shape == (3, 2, 8, 10) and result.losses.shape == (2, 2)
    for g in range(2):
        one = engine.adapt(xs[g], steps=2, lr=1e-2, mode="episodic")
        assert torch.equal(result.logits[:, g], one.logits)
        assert torch.equal(result.losses[:, g], one.losses)
