"""The RGB (ImageNet-C) corruptions: parity with imagecorruptions at 224x224, Hendrycks'
constant tables, per-sample determinism, the size rule and one-line errors."""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from pipeline.corruptions import imagenet_c
from pipeline.corruptions.imagenet_c import blur, digital, noise
from pipeline.corruptions.imagenet_c.core import quantise
from pipeline.errors import TTTPipeError

ic = pytest.importorskip("imagecorruptions")  # the `test` extra
MINE = ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "defocus_blur", "glass_blur",
        "motion_blur", "zoom_blur", "gaussian_blur", "brightness", "contrast", "saturate",
        "elastic_transform", "pixelate", "jpeg_compression"]


def _images(n, h, w=None, seed=0):
    """Smooth colour images with flat, black, white and grey patches (HSV edge cases)."""
    w = w or h
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.random((n, 3, h, w)), (0, 0, h / 40, w / 40))
    x = (x - x.min()) / np.ptp(x) * 300 - 20
    x[:, :, :h // 8, :w // 8] = 0
    x[:, :, -h // 8:, -w // 8:] = 255
    x[:, :, :h // 8, -w // 8:] = 128  # grey
    return np.clip(x, 0, 255).astype(np.uint8)


def _reference(x, name, severity):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.stack([ic.corrupt(im.transpose(1, 2, 0).copy(), severity=severity, corruption_name=name)
                         .transpose(2, 0, 1) for im in x])


# --- parity at 224x224 (ImageNet constants) ------------------------------------------------

@pytest.mark.parametrize("name", ["gaussian_blur", "defocus_blur", "zoom_blur", "brightness", "contrast",
                                  "saturate", "pixelate", "jpeg_compression"])
def test_deterministic_corruptions_match_imagecorruptions(name):
    x = _images(1, 224)
    for s in range(1, 6):
        ours = imagenet_c.corrupt(x, name, s, [0], seed=0).astype(int)
        diff = np.abs(ours - _reference(x, name, s).astype(int))
        # within one uint8 level; the reference truncates float64 values such as 254.99999
        assert diff.max() <= 1, (name, s, diff.max())
        assert diff.mean() < 0.25, (name, s, diff.mean())


@pytest.mark.parametrize("name", ["gaussian_noise", "speckle_noise", "shot_noise"])
def test_noise_statistics_match_imagecorruptions(name):
    x = _images(2, 224)
    for s in (1, 3, 5):
        d_ours = imagenet_c.corrupt(x, name, s, [0, 1], seed=0).astype(float) - x
        d_ref = _reference(x, name, s).astype(float) - x
        # means agree within sampling error (4 standard errors) plus the reference's truncation
        assert abs(d_ours.mean() - d_ref.mean()) < 0.5 + 4 * d_ref.std() / math.sqrt(d_ref.size), (name, s)
        assert d_ours.std() == pytest.approx(d_ref.std(), rel=0.02), (name, s)


def test_impulse_noise_statistics_match_imagecorruptions():
    x = _images(2, 224)
    for s in (1, 5):
        ours, ref = imagenet_c.corrupt(x, "impulse_noise", s, [0, 1], seed=0), _reference(x, "impulse_noise", s)
        for value in (0, 255):
            assert np.mean(ours == value) == pytest.approx(np.mean(ref == value), abs=0.004)
        assert np.mean(ours != x) == pytest.approx(np.mean(ref != x), abs=0.004)


def test_poisson_inversion_is_exact():
    level = np.random.default_rng(0).integers(0, 256, 4000).astype(np.int32)
    u = np.random.default_rng(1).random(4000)
    from scipy import stats
    assert np.array_equal(noise.poisson_counts(level, u, 60.0), stats.poisson.ppf(u, level / 255 * 60))


def test_motion_blur_matches_imagecorruptions_at_a_fixed_angle():
    from imagecorruptions.corruptions import _motion_blur
    x = _images(2, 224)
    for (radius, sigma), angle in zip([(10, 3), (20, 15)], (-31.0, 44.0)):
        ours = quantise(blur.motion_blur_at(torch.from_numpy(x).float() / 255, [angle, angle], radius, sigma))
        ref = np.uint8(np.clip(_motion_blur(x[0].transpose(1, 2, 0), radius, sigma, angle), 0, 255))
        assert np.abs(ours[0].astype(int) - ref.transpose(2, 0, 1)).max() <= 1


def test_motion_blur_statistics():
    x = _images(2, 224)
    ours = imagenet_c.corrupt(x, "motion_blur", 3, [0, 1], 0).astype(float)
    ref = _reference(x, "motion_blur", 3).astype(float)
    assert np.abs(ours - x).mean() == pytest.approx(np.abs(ref - x).mean(), rel=0.5)


def test_glass_shuffle_is_the_sequential_copy():
    rng = np.random.default_rng(0)
    for h, w, d, its in [(12, 10, 1, 2), (16, 16, 2, 3), (21, 17, 3, 1), (18, 23, 4, 2), (9, 7, 3, 2)]:
        off = rng.integers(-d, d, size=(2, its, h - 2 * d, w - 2 * d, 2), dtype=np.int8)
        perm = blur.shuffle_permutation(h, w, d, off).numpy()
        for n in range(2):
            img = np.arange(h * w).reshape(h, w)
            for it in range(its):
                for a, r in enumerate(range(h - d, d, -1)):
                    for b, c in enumerate(range(w - d, d, -1)):
                        dx, dy = off[n, it, a, b]
                        img[r, c] = img[r + dy, c + dx]
            assert np.array_equal(img.ravel(), perm[n])


def test_glass_copy_semantics_match_the_reference_kernel():
    """imagecorruptions' numba kernel duplicates pixels (its view swap is a copy); so do we."""
    from imagecorruptions.corruptions import _shuffle_pixels_njit_glass_blur as kernel
    h = 40
    ref = kernel(h, h, np.arange(h * h * 3, dtype=np.int64).reshape(h, h, 3) // 3, (0.7, 2, 2), 0)
    off = np.random.default_rng(0).integers(-2, 2, size=(1, 2, h - 4, h - 4, 2), dtype=np.int8)
    ours = blur.shuffle_permutation(h, h, 2, off).numpy()[0]
    ref_distinct = len(np.unique(ref[..., 0])) / h ** 2
    assert len(np.unique(ours)) / h ** 2 == pytest.approx(ref_distinct, abs=0.05) and ref_distinct < 0.8


def test_glass_blur_statistics():
    x = _images(2, 224)
    for s in (1, 5):
        ours = imagenet_c.corrupt(x, "glass_blur", s, [0, 1], 0).astype(float)
        ref = _reference(x, "glass_blur", s).astype(float)
        assert np.abs(ours - x).mean() == pytest.approx(np.abs(ref - x).mean(), rel=0.1)


def test_elastic_warp_matches_opencv_and_scipy():
    cv2 = pytest.importorskip("cv2")
    from scipy.ndimage import map_coordinates
    x = _images(1, 64)
    img = x[0].transpose(1, 2, 0).astype(np.float32) / 255
    m = digital.affine_matrix(64, 64, np.random.default_rng(0).uniform(-3, 3, (3, 2)))
    warped = cv2.warpAffine(img, m, (64, 64), borderMode=cv2.BORDER_REFLECT_101)
    dx, dy = np.random.default_rng(1).normal(0, 2, (2, 64, 64)).astype(np.float32)
    yy, xx = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    want = np.stack([map_coordinates(warped[..., c], [yy + dy, xx + dx], order=1, mode="reflect")
                     for c in range(3)])
    got = digital.elastic_warp(torch.from_numpy(img.transpose(2, 0, 1)[None].copy()), m[None],
                               torch.from_numpy(dx[None]), torch.from_numpy(dy[None]))[0].numpy()
    assert np.abs(got - want).max() < 1.5 / 255


def test_affine_matrix_is_opencvs():
    cv2 = pytest.importorskip("cv2")
    jitter = np.random.default_rng(0).uniform(-5, 5, (3, 2))
    c, s = np.float32([112, 112]), 224 // 3
    pts1 = np.float32([c + s, [c[0] + s, c[1] - s], c - s])
    want = cv2.getAffineTransform(pts1, (pts1 + jitter).astype(np.float32))
    assert np.allclose(digital.affine_matrix(224, 224, jitter.astype(np.float32).astype(np.float64)), want,
                       atol=1e-4)


# --- the constant tables, literally as make_cifar_c.py / make_imagenet_c.py have them ------

CIFAR = {  # make_cifar_c.py
    "gaussian_noise": [0.04, 0.06, .08, .09, .10],
    "shot_noise": [500, 250, 100, 75, 50],
    "impulse_noise": [.01, .02, .03, .05, .07],
    "speckle_noise": [.06, .1, .12, .16, .2],
    "gaussian_blur": [.4, .6, 0.7, .8, 1],
    "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
    "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
    "zoom_blur": [np.arange(1, 1.06, 0.01), np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01),
                  np.arange(1, 1.21, 0.01), np.arange(1, 1.26, 0.01)],
    "contrast": [.75, .5, .4, .3, 0.15],
    "brightness": [.05, .1, .15, .2, .3],
    "saturate": [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)],
    "jpeg_compression": [80, 65, 58, 50, 40],
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
    "elastic_transform": [(32 * 0, 32 * 0, 32 * 0.08), (32 * 0.05, 32 * 0.2, 32 * 0.07),
                          (32 * 0.08, 32 * 0.06, 32 * 0.06), (32 * 0.1, 32 * 0.04, 32 * 0.05),
                          (32 * 0.1, 32 * 0.03, 32 * 0.03)],
}
IMAGENET = {  # make_imagenet_c.py
    "gaussian_noise": [.08, .12, 0.18, 0.26, 0.38],
    "shot_noise": [60, 25, 12, 5, 3],
    "impulse_noise": [.03, .06, .09, 0.17, 0.27],
    "speckle_noise": [.15, .2, 0.35, 0.45, 0.6],
    "gaussian_blur": [1, 2, 3, 4, 6],
    "glass_blur": [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],
    "defocus_blur": [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],
    "motion_blur": [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)],
    "zoom_blur": [np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01), np.arange(1, 1.21, 0.02),
                  np.arange(1, 1.26, 0.02), np.arange(1, 1.31, 0.03)],
    "contrast": [0.4, .3, .2, .1, .05],
    "brightness": [.1, .2, .3, .4, .5],
    "saturate": [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)],
    "jpeg_compression": [25, 18, 15, 10, 7],
    "pixelate": [0.6, 0.5, 0.4, 0.3, 0.25],
    "elastic_transform": [(244 * 2, 244 * 0.7, 244 * 0.1), (244 * 2, 244 * 0.08, 244 * 0.2),
                          (244 * 0.05, 244 * 0.01, 244 * 0.02), (244 * 0.07, 244 * 0.01, 244 * 0.02),
                          (244 * 0.12, 244 * 0.01, 244 * 0.02)],
}


def _as_reference(name, params):
    """Our keyword constants in the reference's c[...] form."""
    if name == "zoom_blur":
        return np.arange(1, params["stop"], params["step"])
    values = tuple(params.values())
    return values[0] if len(values) == 1 else values


@pytest.mark.parametrize("name", MINE)
def test_constant_tables_are_hendrycks(name):
    entry = imagenet_c.RGB_CORRUPTIONS[name]
    for table, want in (("cifar", CIFAR[name]), ("imagenet", IMAGENET[name])):
        for s in range(5):
            got = _as_reference(name, getattr(entry, table)[s])
            assert np.array_equal(np.asarray(got, dtype=float), np.asarray(want[s], dtype=float)), (table, s)


# --- determinism, batch independence, shapes, sizes ------------------------------------------

@pytest.mark.parametrize("name", MINE)
def test_per_sample_determinism_and_batch_independence(name):
    x = _images(3, 32, seed=1)
    ids = np.array([5, 9, 2])
    full = imagenet_c.corrupt(x, name, 3, ids, seed=7)
    assert full.dtype == np.uint8 and full.shape == x.shape
    assert np.array_equal(full, imagenet_c.corrupt(x, name, 3, ids, seed=7))
    alone = imagenet_c.corrupt(x[1:2], name, 3, ids[1:2], seed=7)
    assert np.array_equal(alone[0], full[1])
    order = [2, 0, 1]
    assert np.array_equal(imagenet_c.corrupt(x[order], name, 3, ids[order], seed=7), full[order])
    if imagenet_c.RGB_CORRUPTIONS[name].random:
        other = imagenet_c.corrupt(x, name, 3, ids, seed=8)
        assert not np.array_equal(other, full)


@pytest.mark.parametrize("name", MINE)
def test_any_size(name):
    x = _images(2, 40, 56, seed=2)
    for s in (1, 5):
        y = imagenet_c.corrupt(x, name, s, [0, 1], seed=0)
        assert y.shape == x.shape and y.dtype == np.uint8
        assert not np.array_equal(y, x)


def test_size_rule():
    assert imagenet_c.table_for(32, 32) == "cifar" and imagenet_c.table_for(64, 100) == "cifar"
    assert imagenet_c.table_for(65, 65) == "imagenet" and imagenet_c.table_for(224, 224) == "imagenet"
    assert imagenet_c.size_scale(32, 32) == 1.0 and imagenet_c.size_scale(224, 224) == 1.0
    assert imagenet_c.size_scale(448, 500) == 2.0 and imagenet_c.size_scale(16, 16) == 0.5


def test_pixel_constants_scale_with_size():
    """gaussian_blur at 448x448 is skimage's gaussian with sigma twice the 224 table's."""
    x = _images(1, 448)
    ours = imagenet_c.corrupt(x, "gaussian_blur", 2, [0], 0).astype(int)
    want = np.stack([ndimage.gaussian_filter(c / 255.0, 2 * 2, mode="nearest") for c in x[0]])
    assert np.abs(ours[0] - np.floor(np.clip(want, 0, 1) * 255 + 1e-3)).max() <= 1


def test_names():
    assert len(imagenet_c.COMMON) == 15 and len(imagenet_c.VALIDATION) == 4 and len(imagenet_c.ALL) == 19
    assert list(imagenet_c.ALL) == ic.get_corruption_names("all")
    assert list(imagenet_c.VALIDATION) == ic.get_corruption_names("validation")


@pytest.mark.parametrize("args, match", [
    ((np.zeros((2, 1, 32, 32), np.uint8), "fog", 1), "RGB images"),
    ((np.zeros((2, 3, 32, 32), np.float32), "fog", 1), "uint8"),
    ((np.zeros((2, 3, 32, 32), np.uint8), "zoom_blur", 6), "severity 6 is out of range"),
    ((np.zeros((2, 3, 32, 32), np.uint8), "shear", 1), "unknown imagenet-c corruption"),
    ((np.zeros((2, 3, 2, 2), np.uint8), "contrast", 1), "at least 4x4"),
])
def test_errors_are_one_line(args, match):
    with pytest.raises(TTTPipeError, match=match) as err:
        imagenet_c.corrupt(*args, sample_ids=[0, 1], seed=0)
    assert "\n" not in str(err.value)


def test_sample_ids_and_seed_checked():
    x = np.zeros((2, 3, 32, 32), np.uint8)
    with pytest.raises(TTTPipeError, match="sample_ids"):
        imagenet_c.corrupt(x, "contrast", 1, [0], seed=0)
    with pytest.raises(TTTPipeError, match="seed"):
        imagenet_c.corrupt(x, "contrast", 1, [0, 1], seed=-1)
    assert math.isclose(imagenet_c.size_scale(32, 32), 1.0)


def test_docs_show_the_constant_tables():
    from pathlib import Path

    from pipeline.corruptions.imagenet_c.markdown import rgb_markdown_table
    doc = Path(__file__).resolve().parents[2] / "docs" / "corruptions.md"
    assert rgb_markdown_table() in doc.read_text(), (
        "docs/corruptions.md is stale: paste `python -m pipeline.corruptions --markdown-rgb`")


@pytest.mark.parametrize("h, w", [(40, 56), (100, 90), (224, 224)])
def test_pixelate_is_pillow_box_box(h, w):
    """make_*_c.py's BOX down, BOX up. 224x224 takes the NEAREST upscale, 100x90 s3 the gather
    (BOX copies pixels NEAREST does not pick), so both shortcuts are checked."""
    from PIL import Image
    x = _images(1, h, w)
    table = imagenet_c.RGB_CORRUPTIONS["pixelate"]
    for s in range(1, 6):
        c = getattr(table, imagenet_c.table_for(h, w))[s - 1]["c"]
        im = Image.fromarray(x[0].transpose(1, 2, 0).copy())
        want = np.asarray(im.resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.BOX))
        assert np.array_equal(imagenet_c.corrupt(x, "pixelate", s, [0], 0)[0], want.transpose(2, 0, 1))


def test_pixelate_shortcuts_are_the_ones_tested():
    from PIL import Image

    from pipeline.corruptions.imagenet_c.digital import _up_source

    def same(n_in, n_out):
        return _up_source(n_in, n_out, Image.BOX) == _up_source(n_in, n_out, Image.NEAREST)
    assert same(int(224 * 0.6), 224) and same(int(224 * 0.25), 224)
    for n_in, n_out in ((40, 100), (36, 90)):  # 100x90 at s3 (c=0.4): a copy, not NEAREST's
        assert _up_source(n_in, n_out, Image.BOX) is not None and not same(n_in, n_out)
    assert _up_source(2, 5, Image.BOX) == (0, 0, 1, 1, 1)  # output centres 0.2 .. 1.8 of 2


@pytest.mark.parametrize("h, w", [(32, 32), (97, 131), (224, 224)])
def test_jpeg_is_pillows_round_trip(h, w, monkeypatch):
    """Pillow encodes; simplejpeg's decode of those bytes must give Pillow's own pixels."""
    import io

    from PIL import Image
    assert digital.simplejpeg is not None  # a dependency: the fast decode is what runs
    x = _images(3, h, w)
    table = imagenet_c.RGB_CORRUPTIONS["jpeg_compression"]
    fast = [imagenet_c.corrupt(x, "jpeg_compression", s, [0, 1, 2], 0) for s in range(1, 6)]
    monkeypatch.setattr(digital, "simplejpeg", None)
    for s in range(1, 6):
        q = getattr(table, imagenet_c.table_for(h, w))[s - 1]["quality"]
        for i in range(3):
            buf = io.BytesIO()
            Image.fromarray(x[i].transpose(1, 2, 0).copy()).save(buf, "JPEG", quality=q)
            want = np.asarray(Image.open(buf).convert("RGB")).transpose(2, 0, 1)
            assert np.array_equal(fast[s - 1][i], want), (s, i)
        assert np.array_equal(imagenet_c.corrupt(x, "jpeg_compression", s, [0, 1, 2], 0), fast[s - 1])
