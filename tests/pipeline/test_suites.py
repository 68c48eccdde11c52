"""The suite dispatcher: mnist-c is today's corrupt bit for bit; names are checked per suite."""

import numpy as np
import pytest

from pipeline.corruptions import corrupt, list_corruptions
from pipeline.corruptions import imagenet_c
from pipeline.corruptions.suites import (SUITES, corrupt_batch, output_dtype, parse_corruptions,
                                         suite_for)
from pipeline.datasets import to_float
from pipeline.errors import TTTPipeError


def _gray(n=4):
    return np.random.default_rng(0).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)


def test_suite_for_picks_by_channels():
    assert suite_for((1, 28, 28)) == "mnist-c"
    assert suite_for((3, 32, 32)) == "imagenet-c"
    assert SUITES == ("mnist-c", "imagenet-c")
    with pytest.raises(TTTPipeError, match="4-channel"):
        suite_for((4, 8, 8))


@pytest.mark.parametrize("name", list_corruptions(include_identity=True, include_validation=True))
def test_mnist_c_is_todays_corrupt_bit_for_bit(name):
    x = _gray()
    got = corrupt_batch(x, name, 4, np.arange(4), 3, suite="mnist-c", std=0.3081)
    want = corrupt(to_float(x), name, 4, np.arange(4), 3, 0.3081)  # to_float: (N, C, H, W) now
    assert got.dtype == np.float32 == output_dtype("mnist-c")
    assert np.array_equal(got, want)


def test_parse_selections():
    assert parse_corruptions("all", "mnist-c") == list_corruptions()
    assert parse_corruptions("common", "imagenet-c") == list(imagenet_c.COMMON)
    assert parse_corruptions("validation", "imagenet-c") == [
        "speckle_noise", "gaussian_blur", "spatter", "saturate"]
    assert len(parse_corruptions("all", "imagenet-c")) == 19
    assert parse_corruptions("fog, frost,fog", "imagenet-c") == ["fog", "frost"]
    assert parse_corruptions("identity,fog", "mnist-c") == ["identity", "fog"]
    assert parse_corruptions("validation", "mnist-c") == [
        "contrast", "gaussian_blur", "speckle_noise", "stretch"]   # grayscale: held out of "all"
    assert parse_corruptions("stretch", "mnist-c") == ["stretch"]
    assert output_dtype("imagenet-c") == np.uint8


@pytest.mark.parametrize("spec, suite, match", [
    ("frost", "mnist-c", "imagenet-c corruption that needs RGB"),
    ("common", "mnist-c", "imagenet-c \\(RGB\\) selection"),
    ("stretch", "imagenet-c", "mnist-c \\(grayscale\\) corruption"),
    ("shear", "imagenet-c", "mnist-c \\(grayscale\\) corruption"),
    ("nope", "imagenet-c", "unknown corruption"),
    ("", "imagenet-c", "no corruption given"),
    ("fog", "cifar-c", "unknown corruption suite"),
])
def test_parse_errors_are_one_line(spec, suite, match):
    with pytest.raises(TTTPipeError, match=match) as err:
        parse_corruptions(spec, suite)
    assert "\n" not in str(err.value)


def test_corrupt_batch_errors():
    rgb = np.zeros((2, 3, 32, 32), np.uint8)
    with pytest.raises(TTTPipeError, match="imagenet-c corruption that needs RGB"):
        corrupt_batch(_gray(2), "frost", 1, [0, 1], 0, suite="mnist-c", std=0.3)
    with pytest.raises(TTTPipeError, match="belong to the imagenet-c suite"):
        corrupt_batch(rgb, "fog", 1, [0, 1], 0, suite="mnist-c", std=0.3)
    with pytest.raises(TTTPipeError, match="uint8"):
        corrupt_batch(rgb.astype(np.float32), "fog", 1, [0, 1], 0, suite="imagenet-c")
    with pytest.raises(TTTPipeError, match="selection"):
        corrupt_batch(rgb, "all", 1, [0, 1], 0, suite="imagenet-c")
    with pytest.raises(TTTPipeError, match="one normalisation std"):
        corrupt_batch(_gray(2), "fog", 1, [0, 1], 0, suite="mnist-c", std=(0.2, 0.3, 0.4))


def test_imagenet_c_identity_returns_clean_uint8():
    rgb = np.random.default_rng(1).integers(0, 256, (2, 3, 40, 36), dtype=np.uint8)
    out = corrupt_batch(rgb, "identity", 0, [0, 1], 0, suite="imagenet-c")
    assert out.dtype == np.uint8 and np.array_equal(out, rgb) and out is not rgb
