"""The corruption suite: ranges, severity ordering, the seeds' noise, determinism, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pipeline.corruptions.core as core
from pipeline.corruptions import (CORRUPTIONS, SEVERITIES, corrupt, list_corruptions,
                                  list_validation_corruptions, markdown_table, parse_corruptions,
                                  parse_severities)
from pipeline.errors import TTTPipeError

MNIST_STD = 0.3081
REPORTED = list_corruptions()                            # the suite ("all")
VALIDATION = ["contrast", "gaussian_blur", "speckle_noise", "stretch"]
ALL = list_corruptions(include_validation=True)          # every generic test covers both
MNIST_C_NAMES = {"shot_noise", "impulse_noise", "glass_blur", "motion_blur", "shear", "scale",
                 "rotate", "brightness", "translate", "stripe", "fog", "spatter", "dotted_line",
                 "zigzag", "canny_edges"}
DOC = Path(__file__).resolve().parents[2] / "docs" / "corruptions.md"


def strokes(n: int, seed: int = 0) -> np.ndarray:
    """Digit-like images: three thick anti-aliased strokes each, float32 (n, 1, 28, 28) in [0, 1]."""
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[0:28, 0:28].astype(np.float64)
    out = np.zeros((n, 28, 28))
    for _ in range(3):
        p0, p1 = rng.uniform(6, 22, (n, 2)), rng.uniform(6, 22, (n, 2))
        d = (p1 - p0)[:, :, None, None]
        a = p0[:, :, None, None]
        t = np.clip(((rr - a[:, 0]) * d[:, 0] + (cc - a[:, 1]) * d[:, 1])
                    / np.maximum((d ** 2).sum(1), 1e-9), 0, 1)
        dist2 = (rr - a[:, 0] - t * d[:, 0]) ** 2 + (cc - a[:, 1] - t * d[:, 1]) ** 2
        out = np.maximum(out, np.exp(-dist2 / 2.0))
    return np.clip(out * 1.3, 0, 1).astype(np.float32)[:, None]


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return strokes(256, seed=1)


def run(x, name, severity, ids=None, seed=0, norm_std=MNIST_STD):
    ids = np.arange(len(x)) if ids is None else ids
    return corrupt(x, name, severity, ids, seed=seed, norm_std=norm_std)


def test_the_suite_is_mnist_c_plus_the_seeds_noise():
    assert set(REPORTED) == MNIST_C_NAMES | {"gaussian_noise"}
    assert REPORTED == sorted(REPORTED) and "identity" not in REPORTED
    assert list_corruptions(include_identity=True) == sorted(REPORTED + ["identity"])
    assert ALL == sorted(REPORTED + VALIDATION)
    for c in CORRUPTIONS.values():
        assert all(len(v) == len(SEVERITIES) for v in c.table.values()), c.name


@pytest.mark.parametrize("name", ALL)
def test_output_is_float32_same_shape_finite_and_input_untouched(name, digits):
    x = digits[:32].copy()
    before = x.copy()
    for severity in (1, 5):
        y = run(x, name, severity)
        assert y.dtype == np.float32 and y.shape == x.shape
        assert np.isfinite(y).all()
        np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("severity", SEVERITIES)
def test_changes_images_within_documented_range(name, severity, digits):
    x = digits[:64]
    y = run(x, name, severity)
    assert np.abs(y - x).mean() > 1e-3
    if CORRUPTIONS[name].clip:
        assert y.min() >= 0.0 and y.max() <= 1.0


@pytest.mark.parametrize("name", ALL)
def test_higher_severity_does_more_damage(name, digits):
    damage = [float(np.abs(run(digits, name, s) - digits).mean()) for s in SEVERITIES]
    assert all(b > a for a, b in zip(damage, damage[1:])), dict(zip(SEVERITIES, damage))


def test_identity_is_the_clean_images_at_any_severity(digits):
    for severity in (0, 3):
        y = run(digits, "identity", severity)
        np.testing.assert_array_equal(y, digits)
        assert y is not digits


@pytest.mark.parametrize("norm_std", [MNIST_STD, 0.3530])
def test_severity_5_gaussian_noise_is_the_seeds_two_sigma_noise(norm_std):
    x = np.full((2000, 1, 28, 28), 0.5, dtype=np.float32)
    x[:, :, 10:18, 10:18] = 1.0
    y = run(x, "gaussian_noise", 5, norm_std=norm_std)
    z = (y.astype(np.float64) - x) / norm_std  # the noise in normalised units
    assert abs(z.std() - 2.0) < 0.01
    assert abs(z.mean()) < 0.01
    assert (y < 0).mean() > 0.1 and (y > 1).mean() > 0.1  # not clipped


def test_gaussian_noise_severities_are_evenly_spaced_fractions_of_the_seeds():
    x = np.zeros((500, 1, 28, 28), dtype=np.float32)
    for s in SEVERITIES:
        z = run(x, "gaussian_noise", s) / MNIST_STD
        assert abs(z.std() - 0.4 * s) < 0.01 * s


@pytest.mark.parametrize("name", ALL)
def test_deterministic_and_independent_of_the_batch(name, digits, monkeypatch):
    x, ids = digits[:24], np.arange(100, 124)
    y = run(x, name, 3, ids, seed=7)
    assert run(x, name, 3, ids, seed=7).tobytes() == y.tobytes()
    alone = run(x[5:6], name, 3, ids[5:6], seed=7)
    assert alone.tobytes() == y[5:6].tobytes()
    order = np.random.default_rng(0).permutation(len(x))
    shuffled = run(x[order], name, 3, ids[order], seed=7)
    assert shuffled.tobytes() == y[order].tobytes()
    monkeypatch.setattr(core, "_CHUNK", 5)  # chunking is an implementation detail
    assert run(x, name, 3, ids, seed=7).tobytes() == y.tobytes()


@pytest.mark.parametrize("name", [n for n in ALL if CORRUPTIONS[n].random])
def test_seed_and_sample_id_change_the_randomness(name, digits):
    x = np.repeat(digits[:1], 8, axis=0)
    y = run(x, name, 5, np.arange(8), seed=0)
    assert not np.array_equal(y, run(x, name, 5, np.arange(8), seed=1))
    assert len({row.tobytes() for row in y}) > 1  # same image, different ids, different draws


def test_parse_corruptions():
    assert parse_corruptions("all") == REPORTED
    assert parse_corruptions(" fog, gaussian_noise ,fog") == ["fog", "gaussian_noise"]
    assert parse_corruptions("identity,all")[0] == "identity"


@pytest.mark.parametrize("spec", ["blurr", "fog,nope", ""])
def test_unknown_corruption_is_a_one_line_error_listing_choices(spec):
    with pytest.raises(TTTPipeError) as err:
        parse_corruptions(spec)
    msg = str(err.value)
    assert "\n" not in msg
    if spec:
        assert "brightness" in msg and "zigzag" in msg and "'all'" in msg


def test_parse_severities():
    assert parse_severities("1,3,5") == [1, 3, 5]
    assert parse_severities("all") == [1, 2, 3, 4, 5]
    assert parse_severities("5, 5,2") == [5, 2]


@pytest.mark.parametrize("spec", ["0", "6", "1,x", "", "-1"])
def test_bad_severity_is_a_one_line_error(spec):
    with pytest.raises(TTTPipeError) as err:
        parse_severities(spec)
    assert "\n" not in str(err.value) and "1-5" in str(err.value)


@pytest.mark.parametrize("kwargs", [
    {"name": "blurr"}, {"severity": 0}, {"severity": 6}, {"severity": "3"},
    {"images": np.zeros((2, 28, 28), np.float32)}, {"images": np.zeros((2, 1, 28, 28), np.uint8)},
    {"sample_ids": np.arange(3)}, {"sample_ids": np.array([-1, 0])}, {"seed": -1},
    {"norm_std": 0.0},
])
def test_corrupt_rejects_bad_arguments_in_one_line(kwargs):
    args = {"images": np.zeros((2, 1, 28, 28), np.float32), "name": "fog", "severity": 3,
            "sample_ids": np.arange(2), "seed": 0, "norm_std": MNIST_STD} | kwargs
    with pytest.raises(TTTPipeError) as err:
        corrupt(**args)
    assert "\n" not in str(err.value)


def test_doc_table_is_generated_from_the_code():
    assert markdown_table() in DOC.read_text(), (
        "docs/corruptions.md is stale: paste the output of `python -m pipeline.corruptions --markdown`")


def test_validation_corruptions_are_held_out_of_all_and_selected_by_name():
    assert list_validation_corruptions() == VALIDATION
    assert all(CORRUPTIONS[n].validation for n in VALIDATION)
    assert not any(CORRUPTIONS[n].validation for n in REPORTED)
    assert not set(VALIDATION) & set(parse_corruptions("all"))
    assert parse_corruptions("validation") == VALIDATION
    assert parse_corruptions("fog,stretch") == ["fog", "stretch"]
    with pytest.raises(TTTPipeError, match="for tuning: contrast") as err:
        parse_corruptions("nope")
    assert "\n" not in str(err.value)


def test_validation_corruptions_follow_their_definitions(digits):
    x = digits[:16]
    ids = np.arange(16)
    mean = x.mean(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(run(x, "contrast", 5), np.clip((x - mean) * 0.05 + mean, 0, 1),
                               atol=1e-6)
    speckle = run(x, "speckle_noise", 3, ids)
    assert np.array_equal(speckle[x == 0], x[x == 0])         # multiplicative: black stays black
    stretched = run(x, "stretch", 5, ids)
    # one axis shrinks: the ink's extent along the other axis stays, so ink remains
    assert (stretched.sum(axis=(1, 2, 3)) < x.sum(axis=(1, 2, 3))).all()
