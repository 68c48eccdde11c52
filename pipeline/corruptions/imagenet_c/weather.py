"""The four weather corruptions of ImageNet-C for RGB at any size: snow, frost, fog, spatter.

Algorithms and constants are Hendrycks' `make_cifar_c.py` (table `cifar`, 32x32) and
`make_imagenet_c.py` (table `imagenet`, 224x224) as `imagecorruptions` (the parity reference)
runs them: snow's ImageMagick motion blur is its numpy `_motion_blur`, frost crops one of the
frost photos shipped in the `imagecorruptions` package, fog adds a diamond-square plasma
fractal, spatter's OpenCV steps (Canny, chamfer distance transform, histogram equalisation,
box filters) are re-expressed here in torch/scipy with OpenCV's integer arithmetic.

Every function takes `x` (N, 3, H, W) float32 in [0, 1] and one numpy Generator per sample,
draws each sample's randomness from its own generator in the reference's order, and does the
arithmetic over the whole batch. Constants measured in pixels (snow's zoom and blur, spatter's
blur, frost's photo scale) are scaled by min(H, W) / `side`, `side` being the table's
reference size (32 or 224), so at exactly 32x32 / 224x224 they are the reference's.
"""

from __future__ import annotations

import importlib.util
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F

from pipeline.corruptions.imagenet_c.registry import register
from pipeline.errors import TTTPipeError

__all__ = ["snow", "frost", "fog", "spatter", "plasma_fractal", "canny", "FROST_FILES"]

FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
_GRAY = (0.299, 0.587, 0.114)  # OpenCV's RGB2GRAY weights
_WATER = (175 / 255, 238 / 255, 238 / 255)  # pale turquoise, RGB
_MUD = (63 / 255, 42 / 255, 20 / 255)  # mud brown, RGB


def _pixels(value: float, height: int, width: int, side: int) -> float:
    """A constant in pixels at the reference size `side`, at this image size."""
    return value * min(height, width) / side


def _gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage's 1-D Gaussian weights (radius int(truncate * sigma + 0.5)), float64."""
    radius = int(truncate * sigma + 0.5)
    k = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 / sigma ** 2 * k ** 2)
    return k / k.sum()


def _gaussian_nearest(a: torch.Tensor, sigma: float) -> torch.Tensor:
    """skimage.filters.gaussian(a, sigma) on (N, H, W): separable, mode 'nearest', truncate 4."""
    k = _gaussian_kernel(sigma).to(a.dtype)
    r = (len(k) - 1) // 2
    y = a.unsqueeze(1)  # (N, 1, H, W)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return y[:, 0]


def _box3(a: torch.Tensor) -> torch.Tensor:
    """The sum over each 3x3 window of (N, H, W), OpenCV's default border (reflect-101)."""
    p = F.pad(a.unsqueeze(1), (1, 1, 1, 1), mode="reflect")[:, 0]
    rows = p[:, :-2] + p[:, 1:-1] + p[:, 2:]
    return rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:]


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma with OpenCV's weights."""
    return (x[:, 0] * _GRAY[0] + x[:, 1] * _GRAY[1] + x[:, 2] * _GRAY[2]).unsqueeze(1)


# ----------------------------------------------------------------------------------- snow

def _zoom_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """scipy.ndimage.zoom's order-1 resampling along one axis as an (n_out, n_in) matrix."""
    a = torch.zeros(n_out, n_in, dtype=torch.float64)
    if n_out == 1 or n_in == 1:
        a[:, 0] = 1.0
        return a
    pos = torch.arange(n_out, dtype=torch.float64) * ((n_in - 1) / (n_out - 1))
    lo = pos.floor().long().clamp(max=n_in - 1)
    frac = pos - lo
    rows = torch.arange(n_out)
    a[rows, lo] += 1.0 - frac
    a[rows, (lo + 1).clamp(max=n_in - 1)] += frac
    return a


def _clipped_zoom(layer: torch.Tensor, zoom: float) -> torch.Tensor:
    """imagecorruptions' clipped_zoom on (N, H, W): centre crop of ceil(side / zoom), zoomed
    back by `zoom` (linear); the result is at least H x W and is cropped by the caller."""
    _, h, w = layer.shape
    ch, cw = math.ceil(h / zoom), math.ceil(w / zoom)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = layer[:, top:top + ch, left:left + cw]
    ay = _zoom_matrix(ch, round(ch * zoom)).to(layer.device)
    ax = _zoom_matrix(cw, round(cw * zoom)).to(layer.device)
    return ay @ crop @ ax.T  # (N, Hz, Wz)


def _motion_offsets(radius: int, sigma: float, angles: np.ndarray, hz: int, wz: int):
    """imagecorruptions' _motion_blur taps: weights (N, width) and offsets dy, dx (N, width)."""
    width = 2 * radius + 1
    k = np.exp(-np.arange(width) ** 2 / (2 * sigma ** 2)) / (np.sqrt(2 * np.pi) * sigma)
    k = k / np.sum(k)
    n = len(angles)
    dy = np.zeros((n, width), dtype=np.int64)
    dx = np.zeros((n, width), dtype=np.int64)
    weights = np.zeros((n, width))
    for s, angle in enumerate(angles):
        p0, p1 = width * np.sin(np.deg2rad(angle)), width * np.cos(np.deg2rad(angle))
        hypot = math.hypot(p0, p1)
        for i in range(width):
            oy, ox = -math.ceil(((i * p0) / hypot) - 0.5), -math.ceil(((i * p1) / hypot) - 0.5)
            if abs(oy) >= hz or abs(ox) >= wz:
                break  # the reference stops where the motion leaves the layer
            dy[s, i], dx[s, i], weights[s, i] = oy, ox, k[i]
    return weights, dy, dx


def _motion_blur(layer: torch.Tensor, radius: int, sigma: float, angles: np.ndarray,
                 out_h: int, out_w: int) -> torch.Tensor:
    """Sum of edge-clamped shifts of (N, Hz, Wz), kept to the top-left (out_h, out_w)."""
    n, hz, wz = layer.shape
    weights, dy, dx = _motion_offsets(radius, sigma, angles, hz, wz)
    weights = torch.from_numpy(weights).to(layer)
    dy, dx = torch.from_numpy(dy).to(layer.device), torch.from_numpy(dx).to(layer.device)
    rows = torch.arange(out_h, device=layer.device)
    cols = torch.arange(out_w, device=layer.device)
    batch = torch.arange(n, device=layer.device)[:, None, None]
    out = torch.zeros(n, out_h, out_w, dtype=layer.dtype, device=layer.device)
    for i in range(weights.shape[1]):
        r = (rows[None] - dy[:, i, None]).clamp(0, hz - 1)  # (N, out_h)
        c = (cols[None] - dx[:, i, None]).clamp(0, wz - 1)  # (N, out_w)
        out = out + weights[:, i, None, None] * layer[batch, r[:, :, None], c[:, None, :]]
    return out


SNOW_CIFAR = ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
              (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
              (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8))
SNOW_IMAGENET = ((0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
                 (0.55, 0.3, 4, 0.9, 12, 8, 0.7), (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
                 (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55))
_SNOW_KEYS = ("loc", "scale", "zoom", "threshold", "radius", "sigma", "blend")


def _table(rows, keys, **extra) -> tuple[dict, ...]:
    return tuple(dict(zip(keys, row), **extra) for row in rows)


@register("snow", "snow flakes (zoomed thresholded noise, motion-blurred) over a greyed image",
          cifar=_table(SNOW_CIFAR, _SNOW_KEYS, side=32),
          imagenet=_table(SNOW_IMAGENET, _SNOW_KEYS, side=224))
def snow(x: torch.Tensor, rngs, *, loc, scale, zoom, threshold, radius, sigma, blend, side):
    n, _, h, w = x.shape
    if n == 0:
        return x.clone()
    zoom = max(1.0, _pixels(zoom, h, w, side))
    radius = max(1, round(_pixels(radius, h, w, side)))
    sigma = _pixels(sigma, h, w, side)
    noise, angles = [], []
    for rng in rngs:  # the reference's order: the noise, then the blur's angle
        noise.append(rng.normal(loc, scale, size=(h, w)))
        angles.append(rng.uniform(-135, -45))
    layer = _clipped_zoom(torch.from_numpy(np.stack(noise)).to(x.device), zoom)  # float64
    layer = torch.where(layer < threshold, 0.0, layer).clamp(0.0, 1.0)
    layer = _motion_blur(layer, radius, sigma, np.asarray(angles), h, w)
    layer = (torch.round(layer * 255) / 255).unsqueeze(1)  # (N, 1, H, W), uint8 round trip
    x = blend * x + (1 - blend) * torch.maximum(x, _gray(x) * 1.5 + 0.5)
    return (x + layer + torch.flip(layer, (2, 3))).to(torch.float32)


# ---------------------------------------------------------------------------------- frost

def _frost_dir() -> Path:
    spec = importlib.util.find_spec("imagecorruptions")  # located, not imported (cv2, numba)
    folder = Path(next(iter(spec.submodule_search_locations or ())), "frost") if spec else None
    if folder is None or not all((folder / f).is_file() for f in FROST_FILES):
        raise TTTPipeError("frost needs the frost photos shipped with imagecorruptions: "
                           "pip install imagecorruptions-imaug==1.1.5")
    return folder


@lru_cache(maxsize=6)
def _frost_photo(index: int) -> torch.Tensor:
    """Frost photo `index` as float32 (3, h, w) in 0..255, RGB (alpha dropped, as cv2.imread)."""
    from PIL import Image

    with Image.open(_frost_dir() / FROST_FILES[index]) as im:
        rgb = np.asarray(im.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).to(torch.float32)


@lru_cache(maxsize=64)
def _frost_scaled(index: int, height: int, width: int, mode: str) -> torch.Tensor:
    """Photo `index` resized to (height, width) like cv2.resize (bilinear / bicubic), uint8 values."""
    photo = _frost_photo(index)
    if photo.shape[1:] == (height, width):
        return photo
    y = F.interpolate(photo[None], size=(height, width), mode=mode, align_corners=False)[0]
    return torch.round(y).clamp_(0, 255)


def _frost_size(index: int, h: int, w: int, zoom: float, side: int) -> tuple[int, int]:
    """The resized photo's size: `zoom` at the reference size, scaled with the image, and at
    least 1.1x the image (imagecorruptions' rule when the photo is smaller than the image)."""
    fh, fw = _frost_photo(index).shape[1:]
    factor = _pixels(zoom, h, w, side)
    factor = max(factor, 1.1 * max(h / fh, w / fw))
    return math.ceil(fh * factor), math.ceil(fw * factor)


FROST_CIFAR = ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))
FROST_IMAGENET = ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))


@register("frost", "a crop of a frost photo blended over the image",
          cifar=_table(FROST_CIFAR, ("image", "frost"), photos=5, zoom=0.2, mode="bilinear",
                       side=32),
          imagenet=_table(FROST_IMAGENET, ("image", "frost"), photos=6, zoom=1.1, mode="bicubic",
                          side=224))
def frost(x: torch.Tensor, rngs, *, image, frost, photos, zoom, mode, side):
    n, _, h, w = x.shape
    crops = []
    for rng in rngs:  # the reference's order: which photo, then the crop's corner
        index = int(rng.integers(photos))
        fh, fw = _frost_size(index, h, w, zoom, side)
        top, left = int(rng.integers(0, fh - h)), int(rng.integers(0, fw - w))
        crops.append(_frost_scaled(index, fh, fw, mode)[:, top:top + h, left:left + w])
    if n == 0:
        return x.clone()
    layer = torch.stack(crops).to(x.device)  # (N, 3, H, W) in 0..255
    return image * x + (frost / 255) * layer


# ------------------------------------------------------------------------------------ fog

def plasma_fractal(rngs, mapsize: int, decay: float) -> np.ndarray:
    """imagecorruptions' diamond-square heightmap, one per generator: (N, mapsize, mapsize)
    float32 in [0, 1]. The arithmetic runs over the batch; each map draws from its generator."""
    if mapsize & (mapsize - 1):
        raise ValueError(f"plasma_fractal needs a power-of-two mapsize, got {mapsize}")
    maps = np.zeros((len(rngs), mapsize, mapsize), dtype=np.float32)
    step, wibble = mapsize, 100.0

    def wibbled_mean(a: np.ndarray) -> np.ndarray:  # a: (N, h, w)
        noise = np.stack([rng.uniform(-wibble, wibble, a.shape[1:]) for rng in rngs])
        return a / 4 + wibble * noise

    while step >= 2:
        half = step // 2
        corners = maps[:, 0::step, 0::step]
        square = corners + np.roll(corners, -1, axis=1)
        square += np.roll(square, -1, axis=2)
        maps[:, half::step, half::step] = wibbled_mean(square)
        centres = maps[:, half::step, half::step]
        corners = maps[:, 0::step, 0::step]
        lt = centres + np.roll(centres, 1, axis=1) + (corners + np.roll(corners, -1, axis=2))
        maps[:, 0::step, half::step] = wibbled_mean(lt)
        tt = centres + np.roll(centres, 1, axis=2) + (corners + np.roll(corners, -1, axis=1))
        maps[:, half::step, 0::step] = wibbled_mean(tt)
        step //= 2
        wibble /= decay
    maps -= maps.min(axis=(1, 2), keepdims=True)
    return maps / maps.max(axis=(1, 2), keepdims=True)


FOG_CIFAR = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))
FOG_IMAGENET = ((1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4))


@register("fog", "a plasma-fractal haze added, contrast rescaled to the image's maximum",
          cifar=_table(FOG_CIFAR, ("strength", "decay")),
          imagenet=_table(FOG_IMAGENET, ("strength", "decay")))
def fog(x: torch.Tensor, rngs, *, strength, decay):
    n, _, h, w = x.shape
    if n == 0:
        return x.clone()
    mapsize = 1 << (max(h, w) - 1).bit_length()  # the next power of two >= the longer side
    haze = torch.from_numpy(plasma_fractal(rngs, mapsize, decay)[:, :h, :w]).to(x.device)
    top = x.amax(dim=(1, 2, 3), keepdim=True)  # (N, 1, 1, 1)
    return (x + strength * haze.unsqueeze(1)) * top / (top + strength)


# -------------------------------------------------------------------------------- spatter

_TG22 = int(0.4142135623730950488016887242097 * (1 << 15) + 0.5)


def canny(img: np.ndarray, low: int, high: int) -> np.ndarray:
    """cv2.Canny(img, low, high) (3x3 Sobel, L1 magnitude) on (N, H, W) uint8 values -> bool.

    Integer numpy (faster than torch's int ops on CPU): Sobel with replicated borders,
    OpenCV's fixed-point sector test for the non-maximum suppression, hysteresis as the
    8-connected groups of candidates that hold a strong pixel."""
    n, h, w = img.shape
    p = np.pad(img.astype(np.int32), ((0, 0), (1, 1), (1, 1)), mode="edge")
    dx = (p[:, :-2, 2:] + 2 * p[:, 1:-1, 2:] + p[:, 2:, 2:]
          - p[:, :-2, :-2] - 2 * p[:, 1:-1, :-2] - p[:, 2:, :-2])
    dy = (p[:, 2:, :-2] + 2 * p[:, 2:, 1:-1] + p[:, 2:, 2:]
          - p[:, :-2, :-2] - 2 * p[:, :-2, 1:-1] - p[:, :-2, 2:])
    ax, ay = np.abs(dx), np.abs(dy)
    mag = ax + ay
    mp = np.pad(mag, ((0, 0), (1, 1), (1, 1)))  # zero magnitude outside the image

    def at(oy: int, ox: int) -> np.ndarray:
        return mp[:, 1 + oy:1 + oy + h, 1 + ox:1 + ox + w]

    ay = ay << 15
    tg22x = ax * _TG22
    horizontal = ay < tg22x
    vertical = ~horizontal & (ay > tg22x + (ax << 16))
    diagonal = ~horizontal & ~vertical
    same_sign = (dx ^ dy) >= 0
    peak = np.where(horizontal, (mag > at(0, -1)) & (mag >= at(0, 1)),
                    np.where(vertical, (mag > at(-1, 0)) & (mag >= at(1, 0)),
                             np.where(same_sign, (mag > at(-1, -1)) & (mag > at(1, 1)),
                                      (mag > at(-1, 1)) & (mag > at(1, -1)))))
    maybe = (mag > low) & peak
    strong = maybe & (mag > high)
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # never across the batch axis
    labels, count = scipy.ndimage.label(maybe, structure=structure)
    keep = np.zeros(count + 1, dtype=bool)
    keep[labels[strong]] = True
    keep[0] = False
    return keep[labels]


# cv2.DIST_L2 with a 5x5 mask (OpenCV 4.x/5.x: float32 sums of these weights)
_HV, _DIAG, _LONG = np.float32(1.0), np.float32(1.4), np.float32(2.1969)


def _run_min(row: np.ndarray, u: np.ndarray) -> None:
    """row[:, j] = min(u[:, j], row[:, j-1] + 1) left to right, in place, in float32 exactly as
    a sequential scan rounds: relaxed until stable (runs are short: values are capped)."""
    row[:] = u
    while True:
        nxt = np.minimum(row[:, 1:], row[:, :-1] + _HV)
        if np.array_equal(nxt, row[:, 1:]):
            return
        row[:, 1:] = nxt


def _distance_truncated(edges: torch.Tensor, cap: int) -> torch.Tensor:
    """cv2.distanceTransform(~edges, DIST_L2, 5) truncated at `cap` pixels, float32 (N, H, W).

    OpenCV's two raster passes, a row at a time over the whole batch. Values are held at
    cap + 1 (paths only grow, so every distance <= cap is exact and the rest end >= cap)."""
    n, h, w = edges.shape
    hold = np.float32(cap + 1)
    t = np.full((n, h + 4, w + 4), hold, dtype=np.float32)  # outside the image: far
    zero = edges.cpu().numpy()
    c = slice(2, w + 2)

    def sh(row: np.ndarray, dx: int) -> np.ndarray:
        return row[:, 2 + dx:w + 2 + dx]

    for i in range(h):  # forward: rows above, then the left neighbour
        r = i + 2
        up1, up2 = t[:, r - 1], t[:, r - 2]
        u = np.minimum.reduce([sh(up2, -1) + _LONG, sh(up2, 1) + _LONG, sh(up1, -2) + _LONG,
                               sh(up1, -1) + _DIAG, sh(up1, 0) + _HV, sh(up1, 1) + _DIAG,
                               sh(up1, 2) + _LONG, np.full((n, w), hold, np.float32)])
        u[zero[:, i]] = 0
        _run_min(t[:, r, c], u)
    for i in range(h - 1, -1, -1):  # backward: rows below, then the right neighbour
        r = i + 2
        dn1, dn2 = t[:, r + 1], t[:, r + 2]
        u = np.minimum.reduce([t[:, r, c], sh(dn2, 1) + _LONG, sh(dn2, -1) + _LONG,
                               sh(dn1, 2) + _LONG, sh(dn1, 1) + _DIAG, sh(dn1, 0) + _HV,
                               sh(dn1, -1) + _DIAG, sh(dn1, -2) + _LONG])
        _run_min(t[:, r, c][:, ::-1], u[:, ::-1])
    d = np.minimum(t[:, 2:h + 2, c], np.float32(cap))
    return torch.from_numpy(np.ascontiguousarray(d)).to(edges.device)


def _equalize(img: torch.Tensor) -> torch.Tensor:
    """cv2.equalizeHist on (N, H, W) integer images 0..255, per image."""
    n = img.shape[0]
    flat = img.reshape(n, -1).long()
    total = flat.shape[1]
    hist = torch.zeros(n, 256, dtype=torch.int64, device=img.device).scatter_add_(
        1, flat, torch.ones_like(flat))
    first = (hist > 0).to(torch.int8).argmax(dim=1, keepdim=True)  # (N, 1)
    h0 = hist.gather(1, first)
    scale = torch.tensor(255.0) / (total - h0).clamp(min=1).to(torch.float32)
    cum = (hist.cumsum(1) - h0).clamp(min=0).to(torch.float32)
    lut = torch.round(cum * scale).clamp(0, 255)
    lut = torch.where(h0 == total, first.to(torch.float32), lut)  # one grey level: unchanged
    return lut.gather(1, flat).reshape(img.shape)


_EMBOSS = ((-2, -1, 0), (-1, 1, 1), (0, 1, 2))


def _water(liquid: torch.Tensor) -> torch.Tensor:
    """The reference's water mask (N, H, W) before its max-normalisation: the liquid layer's
    uint8 image times a shading from the distance to its Canny edges."""
    # the reference's (liquid * 255).astype(uint8): truncation, and values above 255 wrap
    # around as numpy's cast does on x86 (a liquid level above 1 is rare at these constants)
    lu8 = torch.remainder(torch.floor(liquid * 255), 256)  # float64, uint8 values
    edges = torch.from_numpy(canny(lu8.cpu().numpy().astype(np.uint8), 50, 150))
    dist = _distance_truncated(edges, 20).to(liquid.device)
    dist = torch.floor((_box3(dist.double()) * (1.0 / 9.0)).to(torch.float32))  # blur, uint8
    dist = _equalize(dist)
    p = F.pad(dist.unsqueeze(1), (1, 1, 1, 1), mode="reflect")[:, 0]
    n, h, w = dist.shape
    emb = sum(k * p[:, i:i + h, j:j + w] for i, row in enumerate(_EMBOSS) for j, k in enumerate(row)
              if k)
    emb = emb.clamp(0, 255)
    dist = torch.round(_box3(emb) / 9)  # cv2.blur on uint8 rounds
    return lu8.to(torch.float32) * dist


SPATTER_CIFAR = ((0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0),
                 (0.65, 0.3, 1, 0.69, 0.5, 0), (0.65, 0.1, 0.7, 0.69, 0.6, 1),
                 (0.65, 0.1, 0.5, 0.68, 0.6, 1))
SPATTER_IMAGENET = ((0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0),
                    (0.65, 0.3, 2, 0.68, 0.5, 0), (0.65, 0.3, 1, 0.65, 1.5, 1),
                    (0.67, 0.4, 1, 0.65, 1.5, 1))
_SPATTER_KEYS = ("loc", "scale", "sigma", "threshold", "amount", "mud")


@register("spatter", "water drops (severities 1-3) or mud splashes (4-5) on the lens",
          cifar=_table(SPATTER_CIFAR, _SPATTER_KEYS, side=32),
          imagenet=_table(SPATTER_IMAGENET, _SPATTER_KEYS, side=224))
def spatter(x: torch.Tensor, rngs, *, loc, scale, sigma, threshold, amount, mud, side):
    n, _, h, w = x.shape
    if n == 0:
        return x.clone()
    noise = np.stack([rng.normal(loc, scale, size=(h, w)) for rng in rngs])
    liquid = _gaussian_nearest(torch.from_numpy(noise).to(x.device), _pixels(sigma, h, w, side))
    liquid = torch.where(liquid < threshold, 0.0, liquid)
    if mud == 0:
        m = _water(liquid)
        top = m.amax(dim=(1, 2), keepdim=True)
        m = torch.where(top > 0, m / top.clamp(min=1e-12), 0.0) * amount  # the reference: NaN
        color = torch.tensor(_WATER, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        return x + m.unsqueeze(1) * color
    m = _gaussian_nearest((liquid > threshold).to(torch.float32), _pixels(amount, h, w, side))
    m = torch.where(m < 0.8, 0.0, m).unsqueeze(1)  # (N, 1, H, W)
    color = torch.tensor(_MUD, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return x * (1 - m) + color * m
