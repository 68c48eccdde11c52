"""Digital: brightness, contrast, saturate (HSV as skimage computes it), elastic transform
(make_*_c.py's affine jitter + smoothed displacement field), pixelate and JPEG (Pillow, as the
reference, one image per thread).
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

try:  # libjpeg-turbo's decoder without Pillow's image objects: the same pixels, faster
    import simplejpeg
except ImportError:  # pragma: no cover - a dependency; Pillow decodes instead
    simplejpeg = None

from pipeline.corruptions.imagenet_c.core import size_scale
from pipeline.corruptions.imagenet_c.filters import gaussian_filter, is_small, sample_at
from pipeline.corruptions.imagenet_c.registry import per_pixel, register

__all__ = ["brightness", "contrast", "saturate", "elastic_transform", "pixelate",
           "jpeg_compression", "uint8_native", "rgb_to_hsv", "hsv_to_rgb", "affine_matrix", "elastic_warp"]


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """skimage.color.rgb2hsv over (N, 3, H, W): ties between maxima go to blue, then green."""
    r, g, b = x.unbind(1)
    v = x.amax(1)
    delta = v - x.amin(1)
    safe = torch.where(delta == 0, torch.ones_like(delta), delta)
    s = torch.where(delta == 0, torch.zeros_like(delta), delta / torch.where(v == 0, torch.ones_like(v), v))
    h = torch.where(b == v, 4.0 + (r - g) / safe,
                    torch.where(g == v, 2.0 + (b - r) / safe, (g - b) / safe))
    h = torch.where(delta == 0, torch.zeros_like(h), torch.remainder(h / 6.0, 1.0))
    return torch.stack([h, s, v], 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """skimage.color.hsv2rgb over (N, 3, H, W)."""
    h, s, v = hsv.unbind(1)
    hi = torch.floor(h * 6)
    f = h * 6 - hi
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    hi = torch.remainder(hi.to(torch.int64), 6)
    choices = torch.stack([torch.stack(c, 1) for c in
                           ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    idx = hi[None, :, None].expand(1, -1, 3, -1, -1)  # (1, N, 3, H, W)
    return choices.gather(0, idx)[0]


@register("brightness", "HSV value + c (clipped to [0, 1])",
          cifar=tuple({"c": c} for c in (0.05, 0.1, 0.15, 0.2, 0.3)),
          imagenet=tuple({"c": c} for c in (0.1, 0.2, 0.3, 0.4, 0.5)), random=False)
@per_pixel
def brightness(x, rngs, *, c):
    # At fixed hue and saturation every RGB channel is linear in V, so the HSV round trip is
    # a per-pixel scale by V'/V (black pixels, hue 0 and saturation 0, become grey V').
    v = x.amax(1, keepdim=True)
    v_new = (v + c).clamp_(0, 1)
    return torch.where(v > 0, x * (v_new / torch.where(v > 0, v, torch.ones_like(v))), v_new)


@register("saturate", "HSV saturation * a + b (clipped to [0, 1])",
          cifar=tuple({"a": a, "b": b} for a, b in ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2))),
          imagenet=tuple({"a": a, "b": b} for a, b in ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2))),
          random=False)
@per_pixel
def saturate(x, rngs, *, a, b):
    # At fixed hue and value a channel is V (1 - w S) with w in [0, 1] set by the hue, so with
    # S = delta / V the HSV round trip is ch' = V - (V - ch) * S' V / delta. Grey pixels
    # (delta 0) have hue 0 in skimage: (V, V (1 - S'), V (1 - S')).
    v = x.amax(1, keepdim=True)
    delta = v - x.amin(1, keepdim=True)
    grey = delta == 0
    s = delta / torch.where(v > 0, v, torch.ones_like(v))
    s_new = (s * a + b).clamp_(0, 1)
    coloured = v - (v - x) * (s_new * v / torch.where(grey, torch.ones_like(delta), delta))
    grey_rgb = torch.cat([v, v * (1 - s_new), v * (1 - s_new)], 1)
    return torch.where(grey, grey_rgb, coloured)


@register("contrast", "(x - channel mean) * c + channel mean, per image",
          cifar=tuple({"c": c} for c in (0.75, 0.5, 0.4, 0.3, 0.15)),
          imagenet=tuple({"c": c} for c in (0.4, 0.3, 0.2, 0.1, 0.05)), random=False)
@per_pixel
def contrast(x, rngs, *, c):
    means = x.to(torch.float64).mean((2, 3), keepdim=True).to(x.dtype)
    return (x - means) * c + means


def affine_matrix(height: int, width: int, jitter: np.ndarray) -> np.ndarray:
    """cv2.getAffineTransform(pts1, pts1 + jitter) for the reference's three points around the
    centre (x, y order; the reference's (row, col) centre is the same for square images)."""
    centre = np.array([width // 2, height // 2], dtype=np.float64)
    size = min(height, width) // 3
    pts1 = np.array([centre + size, [centre[0] + size, centre[1] - size], centre - size])
    pts2 = pts1 + jitter
    src = np.hstack([pts1, np.ones((3, 1))])  # (3, 3): M @ [x, y, 1] = pts2
    return np.linalg.solve(src, pts2).T  # (2, 3)


def elastic_warp(x: torch.Tensor, matrices: np.ndarray, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """cv2.warpAffine(x, M, bilinear, BORDER_REFLECT_101) per sample (OpenCV 5 interpolates
    float images at full precision: matches to 1e-5), then map_coordinates(order=1,
    mode='reflect') at (row + dy, col + dx)."""
    n, _, h, w = x.shape
    rows, cols = torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32)
    inv = []
    for m in matrices:  # dst(x, y) = src(M^-1 (x, y))
        full = np.vstack([m, [0.0, 0.0, 1.0]])
        inv.append(np.linalg.inv(full)[:2])
    inv = torch.from_numpy(np.stack(inv).astype(np.float32))  # (N, 2, 3)
    # source (col, row) = inv @ (col, row, 1), built in the grid itself: the products are
    # (N, W) and (N, H) vectors, broadcast once in the sum
    grid = torch.empty((n, h, w, 2), dtype=torch.float32)
    for axis in (0, 1):
        g = grid[..., axis]
        torch.add((inv[:, axis, 0, None] * cols)[:, None, :], (inv[:, axis, 1, None] * rows)[:, :, None], out=g)
        g.add_(inv[:, axis, 2, None, None])
    warped = sample_at(x, grid, "reflect101")
    torch.add(dx, cols, out=grid[..., 0])
    torch.add(dy, rows[:, None], out=grid[..., 1])
    return sample_at(warped, grid, "reflect")


_S224, _S32 = 244, 32  # make_imagenet_c.py writes 244 where it means 224 ("nothing is incorrect")


@register("elastic_transform", "random affine jitter of 3 points (±c), then a displacement field of "
          "alpha * Gaussian(sigma)-smoothed uniform noise",
          cifar=tuple({"alpha": _S32 * a, "sigma": _S32 * s, "affine": _S32 * f}
                      for a, s, f in ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06),
                                      (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))),
          imagenet=tuple({"alpha": _S224 * a, "sigma": _S224 * s, "affine": _S224 * f}
                         for a, s, f in ((2, 0.7, 0.1), (2, 0.08, 0.2), (0.05, 0.01, 0.02),
                                         (0.07, 0.01, 0.02), (0.12, 0.01, 0.02))))
def elastic_transform(x, rngs, *, alpha, sigma, affine):
    n, _, h, w = x.shape
    s = size_scale(h, w)
    alpha, sigma, affine = alpha * s, sigma * s, affine * s
    jitter = np.stack([r.uniform(-affine, affine, size=(3, 2)).astype(np.float32) for r in rngs])
    matrices = np.stack([affine_matrix(h, w, j.astype(np.float64)) for j in jitter])
    noise = np.empty((n, 2, h, w), dtype=np.float32)  # uniform(-1, 1) fields for dx, dy
    for i, r in enumerate(rngs):
        r.random((2, h, w), dtype=np.float32, out=noise[i])
    noise = torch.from_numpy(noise).mul_(2).sub_(1)
    field = gaussian_filter(noise, sigma, mode="reflect", truncate=3) * alpha
    return elastic_warp(x, matrices, field[:, 0], field[:, 1])


def uint8_native(fn):
    """Mark `fn` as taking and returning uint8 (N, 3, H, W) tensors: `corrupt` then skips the
    float round trip (the reference's Pillow corruptions are uint8 to uint8 too) and passes
    `out=`, a uint8 array of the batch's shape for fn to write its result into."""
    fn.uint8_native = True
    return fn


def _pil_map(x: torch.Tensor, fn, size: tuple[int, int] | None = None,
             out: np.ndarray | None = None) -> torch.Tensor:
    """Apply `fn(PIL RGB image) -> PIL image` (or an (H, W, 3) uint8 array) to every uint8
    image, one thread per torch thread; `size` (H, W) is that of fn's images when it is not the
    input's; into `out` if given.

    Above 64x64 planes go in through Pillow's merge and out as one band's bytes at a time
    (faster than numpy's (3, H, W) <-> (H, W, 3) transposes of uint8, and than split);
    small images are transposed."""
    chw = x.numpy()
    if out is None:
        out = np.empty(chw.shape[:2] + tuple(size or chw.shape[2:]), dtype=np.uint8)

    small = is_small(*chw.shape[2:])  # Pillow objects cost more than transposes

    def one(i):
        if small:
            im = fn(Image.fromarray(np.ascontiguousarray(chw[i].transpose(1, 2, 0))))
        else:
            im = fn(Image.merge("RGB", [Image.fromarray(plane) for plane in chw[i]]))
        if not isinstance(im, np.ndarray):
            im = im if im.mode == "RGB" else im.convert("RGB")
            if not small:
                for c, band in enumerate("RGB"):  # Pillow packs one band straight to bytes
                    out[i, c] = np.frombuffer(im.tobytes("raw", band), dtype=np.uint8).reshape(out.shape[2:])
                return
            im = np.asarray(im)
        out[i] = im.transpose(2, 0, 1)

    workers = max(1, min(torch.get_num_threads(), len(chw)))
    if workers == 1:
        for i in range(len(chw)):
            one(i)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, range(len(chw))))
    return torch.from_numpy(out)


@register("pixelate", "Pillow BOX resize to c x the size, then BOX back (make_*_c.py)",
          cifar=tuple({"c": c} for c in (0.95, 0.9, 0.85, 0.75, 0.65)),
          imagenet=tuple({"c": c} for c in (0.6, 0.5, 0.4, 0.3, 0.25)), random=False)
@uint8_native
def pixelate(x, rngs, *, c, out=None):
    h, w = x.shape[-2:]
    small = (max(1, int(w * c)), max(1, int(h * c)))
    rows, cols = _up_source(small[1], h, Image.BOX), _up_source(small[0], w, Image.BOX)
    if rows is None or cols is None:  # not a pixel copy (never seen): Pillow's BOX both ways
        return _pil_map(x, lambda im: im.resize(small, Image.BOX).resize((w, h), Image.BOX), out=out)
    if rows == _up_source(small[1], h, Image.NEAREST) and cols == _up_source(small[0], w, Image.NEAREST):
        # BOX copies the pixels NEAREST picks (224x224, 32x32; 81 % of (side, c) pairs, per
        # axis): NEAREST is ~10x faster than BOX's upscale and than the gather below
        return _pil_map(x, lambda im: im.resize(small, Image.BOX).resize((w, h), Image.NEAREST), out=out)
    down = _pil_map(x, lambda im: im.resize(small, Image.BOX), size=(small[1], small[0]))
    # the BOX upscale as one batched gather per axis (numpy's take: faster than torch's here)
    if out is None:
        out = np.empty(x.shape, dtype=np.uint8)
    np.take(np.take(down.numpy(), cols, axis=3), rows, axis=2, out=out)
    return torch.from_numpy(out)


_PROBE_STEP = 1024  # ramp spacing: any blend of two neighbours falls between multiples


@lru_cache(maxsize=512)
def _up_source(n_in: int, n_out: int, resample: int) -> tuple[int, ...] | None:
    """The source pixel of each output pixel of Pillow's upscale n_in -> n_out along one axis
    with `resample`, or None if some output pixel blends two sources.

    Upscaling, Pillow's box window is one input pixel wide, so each output pixel copies one
    source pixel (weights 1 and 0; its two passes are then an exact 2-D gather), as NEAREST's
    do; both are separable, so two that pick the same sources on each axis give the same
    image. Probed on a 32-bit ramp of multiples of _PROBE_STEP, so a copy shows its index and
    a blend a value between multiples."""
    ramp = Image.fromarray((np.arange(n_in, dtype=np.int32) * _PROBE_STEP)[None, :])
    up = np.asarray(ramp.resize((n_out, 1), resample))[0].astype(np.int64)
    if np.any(up % _PROBE_STEP):
        return None
    return tuple((up // _PROBE_STEP).tolist())  # a tuple: compared, cached, a take index


@register("jpeg_compression", "Pillow JPEG encode at quality q, decode",
          cifar=tuple({"quality": q} for q in (80, 65, 58, 50, 40)),
          imagenet=tuple({"quality": q} for q in (25, 18, 15, 10, 7)), random=False)
@uint8_native
def jpeg_compression(x, rngs, *, quality, out=None):
    def one(im):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=int(quality))
        if simplejpeg is not None:  # Pillow's bytes, decoded to Pillow's pixels (tested)
            return simplejpeg.decode_jpeg(buf.getbuffer(), colorspace="RGB")
        return Image.open(buf)

    return _pil_map(x, one, out=out)
