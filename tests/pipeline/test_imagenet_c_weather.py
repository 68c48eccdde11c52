"""snow, frost, fog, spatter of the imagenet-c suite: constants, parity with imagecorruptions,
per-sample determinism, batch independence, any size.

Parity: with a generator adapter that hands our functions the legacy `np.random` stream the
reference draws from (same calls, same order), the outputs must equal the reference's at
224x224 up to float32-vs-float64 rounding; frost alone differs by at most one uint8 level of
the resized frost photo (cv2's fixed-point bicubic vs torch's float one) times its weight.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import cv2
import imagecorruptions as ic
import numpy as np
import pytest
import scipy.ndimage
import torch
from PIL import Image

from pipeline.corruptions.core import sample_rngs
from pipeline.corruptions.imagenet_c.registry import RGB_CORRUPTIONS
from pipeline.errors import TTTPipeError

weather = importlib.import_module("pipeline.corruptions.imagenet_c.weather")

NAMES = ("snow", "frost", "fog", "spatter")

# make_cifar_c.py's `c` lists, verbatim (hendrycks/robustness, ImageNet-C/create_c)
CIFAR_C = {
    "snow": [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
             (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
             (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)],
    "frost": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],
    "fog": [(.2, 3), (.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
    "spatter": [(0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0),
                (0.65, 0.3, 1, 0.69, 0.5, 0), (0.65, 0.1, 0.7, 0.69, 0.6, 1),
                (0.65, 0.1, 0.5, 0.68, 0.6, 1)],
}
# make_imagenet_c.py's (= imagecorruptions') `c` lists, verbatim
IMAGENET_C = {
    "snow": [(0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
             (0.55, 0.3, 4, 0.9, 12, 8, 0.7), (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
             (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)],
    "frost": [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)],
    "fog": [(1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)],
    "spatter": [(0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0),
                (0.65, 0.3, 2, 0.68, 0.5, 0), (0.65, 0.3, 1, 0.65, 1.5, 1),
                (0.67, 0.4, 1, 0.65, 1.5, 1)],
}
KEYS = {"snow": ("loc", "scale", "zoom", "threshold", "radius", "sigma", "blend"),
        "frost": ("image", "frost"), "fog": ("strength", "decay"),
        "spatter": ("loc", "scale", "sigma", "threshold", "amount", "mud")}


class LegacyStream:
    """The Generator methods our corruptions call, served from np.random's global stream."""

    def normal(self, loc=0.0, scale=1.0, size=None):
        return np.random.normal(loc=loc, scale=scale, size=size)

    def uniform(self, low=0.0, high=1.0, size=None):
        return np.random.uniform(low, high, size)

    def integers(self, low, high=None):
        return np.random.randint(low, high)


def _images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth random RGB images (N, H, W, 3) uint8: structure for the edge-based steps."""
    raw = np.random.RandomState(seed).randint(0, 256, size=(n, h, w, 3)).astype(np.float64)
    return scipy.ndimage.uniform_filter(raw, size=(1, 7, 7, 1)).astype(np.uint8)


def _to_x(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32) / 255


def _ours_on_legacy(name: str, severity: int, images: np.ndarray, seed: int) -> np.ndarray:
    """Our corruption of one image drawing from np.random seeded like the reference run."""
    entry = RGB_CORRUPTIONS[name]
    np.random.seed(seed)
    y = entry.fn(_to_x(images[None]), [LegacyStream()], **entry.imagenet[severity - 1])
    return y.clamp(0, 1)[0].permute(1, 2, 0).numpy().astype(np.float64) * 255


def _reference(name: str, severity: int, image: np.ndarray, seed: int) -> np.ndarray:
    np.random.seed(seed)
    return np.asarray(getattr(ic, name)(Image.fromarray(image), severity), dtype=np.float64)


def test_the_four_are_registered_as_random():
    for name in NAMES:
        assert name in RGB_CORRUPTIONS and RGB_CORRUPTIONS[name].random


@pytest.mark.parametrize("name", NAMES)
def test_constants_are_make_cifar_c_and_make_imagenet_c(name):
    entry = RGB_CORRUPTIONS[name]
    for table, literal in ((entry.cifar, CIFAR_C[name]), (entry.imagenet, IMAGENET_C[name])):
        assert [tuple(p[k] for k in KEYS[name]) for p in table] == literal
    if "side" in entry.cifar[0]:
        assert {p["side"] for p in entry.cifar} == {32} and {p["side"] for p in entry.imagenet} == {224}
    if name == "frost":  # make_cifar_c: 5 photos at 0.2x bilinear; imagecorruptions: 6 at 1.1x bicubic
        assert {(p["photos"], p["zoom"], p["mode"]) for p in entry.cifar} == {(5, 0.2, "bilinear")}
        assert {(p["photos"], p["zoom"], p["mode"]) for p in entry.imagenet} == {(6, 1.1, "bicubic")}


@pytest.mark.parametrize("name", NAMES)
def test_parity_with_imagecorruptions_on_the_same_draws_at_224(name):
    images = _images(5, 224, 224, seed=1)
    for severity in (1, 2, 3, 4, 5):
        for i, image in enumerate(images[severity - 1:severity]):
            seed = 100 * severity + i
            ours, ref = _ours_on_legacy(name, severity, image, seed), _reference(name, severity, image, seed)
            diff = np.abs(ours - ref)
            if name == "frost":  # one uint8 level of the resized photo, times its weight
                weight = IMAGENET_C["frost"][severity - 1][1]
                assert diff.max() <= weight + 1e-3, (severity, diff.max())
                assert (diff > 1e-3).mean() < 1e-3, (severity, (diff > 1e-3).mean())
            else:
                assert diff.max() < 1e-3, (name, severity, diff.max())


@pytest.mark.parametrize("name", NAMES)
def test_statistics_match_the_reference_with_our_generators(name):
    """Our own per-sample generators (other draws than the reference's): the per-image mean
    absolute change and channel means agree with the reference's within 4 standard errors of
    the difference of two means of 16 images (per-image spread measured here: snow +-1.4 of
    74, spatter +-0.6 of 8, fog +-9 of 32, frost +-30 of 65 since the photo drawn dominates).
    The seeds are fixed, so this is deterministic; 4 SE keeps it off the edge while a wrong
    distribution (the constants themselves are pinned exactly by the parity test) moves snow
    and spatter by many SE."""
    n, severity = 16, 3
    images = _images(n, 224, 224, seed=2)
    entry = RGB_CORRUPTIONS[name]
    rngs = sample_rngs(0, name, severity, range(n))
    ours = entry.fn(_to_x(images), rngs, **entry.imagenet[severity - 1]).clamp(0, 1)
    ours = ours.permute(0, 2, 3, 1).numpy().astype(np.float64) * 255
    ref = np.stack([_reference(name, severity, im, 1000 + i) for i, im in enumerate(images)])
    clean = images.astype(np.float64)
    for stat in (lambda y: np.abs(y - clean).mean(axis=(1, 2, 3)),
                 lambda y: y[..., 0].mean(axis=(1, 2)), lambda y: y[..., 1].mean(axis=(1, 2)),
                 lambda y: y[..., 2].mean(axis=(1, 2))):
        a, b = stat(ours), stat(ref)
        se = np.sqrt(a.var(ddof=1) / n + b.var(ddof=1) / n)
        assert abs(a.mean() - b.mean()) <= 4 * se + 1e-6, (name, a.mean(), b.mean(), se)


def test_canny_and_distance_transform_equal_opencv():
    rs = np.random.RandomState(3)
    for sigma in (0.7, 2.0, 4.0):
        liquid = scipy.ndimage.gaussian_filter(rs.normal(0.65, 0.3, (3, 96, 80)), (0, sigma, sigma))
        liquid[liquid < 0.68] = 0
        u8 = (np.clip(liquid, 0, 1) * 255).astype(np.uint8)
        edges = weather.canny(u8, 50, 150)
        ref_edges = np.stack([cv2.Canny(im, 50, 150) > 0 for im in u8])
        assert np.array_equal(edges, ref_edges)
        dist = weather._distance_truncated(ref_edges, 20)
        ref_dist = np.stack([np.minimum(cv2.distanceTransform(255 - 255 * e.astype(np.uint8),
                                                              cv2.DIST_L2, 5), 20)
                             for e in ref_edges])
        assert np.array_equal(dist, ref_dist)
        eq = weather._equalize(u8)
        assert np.array_equal(eq, np.stack([cv2.equalizeHist(im) for im in u8]))


@pytest.mark.parametrize("shape", [(4, 32, 32), (2, 224, 224), (3, 97, 131)])
def test_water_shading_is_the_same_with_and_without_cv2(shape, monkeypatch):
    """cv2, where installed, runs spatter's deterministic water steps; the numpy steps that
    run without it give the same mask, so shards do not depend on what is installed."""
    rs = np.random.RandomState(sum(shape))
    for sigma in (0.7, 2.0, 4.0):
        liquid = scipy.ndimage.gaussian_filter(rs.normal(0.65, 0.3, shape), (0, sigma, sigma), mode="nearest")
        liquid[liquid < 0.68] = 0
        assert np.array_equal(weather._water(liquid, use_cv2=False), weather._water(liquid, use_cv2=True))
    entry = RGB_CORRUPTIONS["spatter"]
    x = _to_x(_images(2, *shape[1:], seed=5))
    table = "imagenet" if shape[1] > 64 else "cifar"
    with_cv2 = entry.fn(x, sample_rngs(3, "spatter", 1, [0, 1]), **getattr(entry, table)[0])
    monkeypatch.setattr(weather, "cv2", None)
    assert torch.equal(with_cv2, entry.fn(x, sample_rngs(3, "spatter", 1, [0, 1]), **getattr(entry, table)[0]))


def test_cv2_is_used_only_where_it_agrees_with_numpy(monkeypatch):
    """The probe: this cv2 agrees; a cv2 whose Canny differed would be left unused."""
    weather._cv2_agrees.cache_clear()
    try:
        assert weather._cv2_agrees()
        weather._cv2_agrees.cache_clear()
        monkeypatch.setattr(weather, "_shade_cv2", lambda im: weather._shade(im[None])[0] + 1)
        assert not weather._cv2_agrees()
        liquid = np.zeros((1, 24, 24))
        liquid[0, 8:16, 8:16] = 0.9
        assert np.array_equal(weather._water(liquid), weather._water(liquid, use_cv2=False))
    finally:
        monkeypatch.undo()
        weather._cv2_agrees.cache_clear()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("table,shape", [("cifar", (32, 32)), ("imagenet", (224, 224)),
                                         ("cifar", (64, 48)), ("imagenet", (80, 100))])
def test_shapes_determinism_and_batch_independence(name, table, shape):
    h, w = shape
    images = _images(3, h, w, seed=4)
    x = _to_x(images)
    entry = RGB_CORRUPTIONS[name]
    params = getattr(entry, table)[4 if name == "spatter" and h == 224 else 2]
    y = entry.fn(x, sample_rngs(7, name, 3, [10, 11, 12]), **params)
    assert y.shape == x.shape and y.dtype == torch.float32 and torch.isfinite(y).all()
    assert (y.clamp(0, 1) - x).abs().mean() > 1e-3  # it corrupts
    again = entry.fn(x, sample_rngs(7, name, 3, [10, 11, 12]), **params)
    assert torch.equal(y, again)  # deterministic per (seed, sample id)
    alone = entry.fn(x[1:2], sample_rngs(7, name, 3, [11]), **params)
    assert torch.equal(y[1:2], alone)  # a sample's output ignores its batch
    other = entry.fn(x[1:2], sample_rngs(7, name, 3, [12]), **params)
    assert not torch.equal(alone, other)  # and depends on its id
    assert torch.equal(x, _to_x(images))  # the input is untouched


def _clear_frost_caches():
    for cached in (weather._frost_dir, weather._frost_photo, weather._frost_scaled):
        cached.cache_clear()


def test_frost_photos_ship_with_the_package_and_equal_imagecorruptions():
    """frost needs no imagecorruptions at run time: the package's photos are its files."""
    ours = Path(weather.__file__).with_name("frost")
    theirs = Path(ic.__file__).with_name("frost")
    for name in weather.FROST_FILES:
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name


def test_frost_with_a_changed_photo_is_one_line_error(monkeypatch):
    monkeypatch.setitem(weather.FROST_SHA256, "frost2.png", "0" * 64)
    _clear_frost_caches()
    try:
        entry = RGB_CORRUPTIONS["frost"]
        with pytest.raises(TTTPipeError, match=r"frost2\.png is missing or changed; reinstall") as err:
            entry.fn(_to_x(_images(1, 32, 32)), sample_rngs(0, "frost", 1, [0]), **entry.cifar[0])
        assert "\n" not in str(err.value)
    finally:
        monkeypatch.undo()
        _clear_frost_caches()
