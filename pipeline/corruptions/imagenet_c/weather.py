"""The four weather corruptions of ImageNet-C for RGB at any size: snow, frost, fog, spatter.

Algorithms and constants are Hendrycks' `make_cifar_c.py` (table `cifar`, 32x32) and
`make_imagenet_c.py` (table `imagenet`, 224x224) as `imagecorruptions` (the parity reference)
runs them: snow's ImageMagick motion blur is its numpy `_motion_blur`, frost crops one of the
frost photos `imagecorruptions` ships (copied into frost/, NOTICE.txt there), fog adds a diamond-square plasma
fractal, spatter's OpenCV steps (Canny, chamfer distance transform, histogram equalisation,
box filters) are re-expressed here in numpy/scipy with OpenCV's arithmetic, so cv2 is not
needed. Where cv2 is installed (any of the opencv-python wheels; the `fast` extra) and gives
the numpy steps' values on a probe batch (checked once per process), those deterministic
per-image steps run in it instead: the same pixels (tested), ~5x faster, since the distance
transform's two raster scans are a Python loop over rows in numpy.

Every function takes `x` (N, 3, H, W) float32 in [0, 1] and one numpy Generator per sample,
draws each sample's randomness from its own generator in the reference's order, and does the
arithmetic over the whole batch. Constants measured in pixels (snow's zoom and blur, spatter's
blur, frost's photo scale) are scaled by min(H, W) / `side`, `side` being the table's
reference size (32 or 224), so at exactly 32x32 / 224x224 they are the reference's.
"""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F

from pipeline.corruptions.imagenet_c.filters import CACHE_VALUES, is_small
from pipeline.corruptions.imagenet_c.registry import per_pixel, register
from pipeline.errors import TTTPipeError

try:  # optional: spatter's water shading in OpenCV (the same pixels as the numpy steps, faster)
    import cv2
except ImportError:  # also a cv2 built for another numpy major version
    cv2 = None

__all__ = ["snow", "frost", "fog", "spatter", "plasma_fractal", "canny", "FROST_FILES"]

FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
_GRAY = (0.299, 0.587, 0.114)  # OpenCV's RGB2GRAY weights
_WATER = (175 / 255, 238 / 255, 238 / 255)  # pale turquoise, RGB
_MUD = (63 / 255, 42 / 255, 20 / 255)  # mud brown, RGB


def _pixels(value: float, height: int, width: int, side: int) -> float:
    """A constant in pixels at the reference size `side`, at this image size."""
    return value * min(height, width) / side


def _gaussian_nearest(a: np.ndarray, sigma: float) -> np.ndarray:
    """skimage.filters.gaussian(a, sigma) on (N, H, W): scipy's separable filter, mode
    'nearest', truncate 4, in the input's dtype (what skimage calls)."""
    return scipy.ndimage.gaussian_filter(a, (0, sigma, sigma), mode="nearest", truncate=4.0)


def _box3(a: np.ndarray) -> np.ndarray:
    """The sum over each 3x3 window of (N, H, W), OpenCV's default border (reflect-101)."""
    p = np.pad(a, ((0, 0), (1, 1), (1, 1)), mode="reflect")
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
    """Sum of edge-clamped shifts of (N, Hz, Wz), kept to the top-left (out_h, out_w).

    A shift with clamped indices is a window of the edge-padded layer; numpy float64, the
    reference's accumulation order (tap by tap)."""
    n, hz, wz = layer.shape
    weights, dy, dx = _motion_offsets(radius, sigma, angles, hz, wz)
    pad = int(max(np.abs(dy).max(), np.abs(dx).max(), 0))
    padded = np.pad(layer.cpu().numpy(), ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    out = np.zeros((n, out_h, out_w))
    term = np.empty((out_h, out_w))
    for s in range(n):  # in place, one sample at a time (cache-resident), same arithmetic
        for i in range(weights.shape[1]):
            if weights[s, i] == 0.0:
                continue  # past the reference's break
            top, left = pad - dy[s, i], pad - dx[s, i]
            np.multiply(padded[s, top:top + out_h, left:left + out_w], weights[s, i], out=term)
            np.add(out[s], term, out=out[s])
    return torch.from_numpy(out).to(layer.device)


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
    flakes = (layer + torch.flip(layer, (2, 3))).to(torch.float32)  # the layer and its 180° turn
    y = torch.maximum(x, _gray(x) * 1.5 + 0.5)  # (N, 3, H, W), in place from here
    y.mul_(1 - blend).add_(x, alpha=blend)
    return y.add_(flakes)


# ---------------------------------------------------------------------------------- frost

# SHA-256 of the photos as imagecorruptions-imaug 1.1.5 ships them (frost/NOTICE.txt).
FROST_SHA256 = {
    "frost1.png": "ff9f907860bd7a835d459e32f9d588062b7f61ee267343cc7222b56753a14755",
    "frost2.png": "fe211a89b336999c207a852ce05818d4545d0b57c5beadd824b4cc9d9a9b6137",
    "frost3.png": "2d0d50b4a9bb213f38b024ef7768731bb83cc08d2f26b5766bbc167cdfa0e504",
    "frost4.jpg": "3f8b91ca1a9fa7167b09e773da53f5ae60d0a1fd88f02a783f6e328a72887f6e",
    "frost5.jpg": "5fc6a19df4a429ba68abdcc8f8a4278d4c9f81c9ccafd2c92ab0c8cf8992ebd2",
    "frost6.jpg": "1f92b2f48408748085b68dd81d816ef239f42cef3029c25d041fcb6760fb4f25",
}


@lru_cache(maxsize=1)
def _frost_dir() -> Path:
    """The frost photos shipped in this package (copied from imagecorruptions, Apache-2.0),
    checked against their checksums once per process."""
    folder = Path(__file__).with_name("frost")
    for name in FROST_FILES:
        path = folder / name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != FROST_SHA256[name]:
            raise TTTPipeError(f"frost photo {path} is missing or changed; reinstall ttt-pipe "
                               "(the photos ship in pipeline/corruptions/imagenet_c/frost/)")
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
@per_pixel
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
    if is_small(h, w):  # small images: one batched blend (per-image calls cost more)
        return image * x + (frost / 255) * torch.stack(crops).to(x.device)
    out = torch.empty_like(x)
    for k, crop in enumerate(crops):  # image * x + frost / 255 * crop (crop in 0..255)
        torch.mul(x[k], image, out=out[k])
        out[k].add_(crop.to(x.device) * (frost / 255))
    return out


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
    return (x + strength * haze.unsqueeze(1)).mul_(top / (top + strength))


# -------------------------------------------------------------------------------- spatter

_TG22 = int(0.4142135623730950488016887242097 * (1 << 15) + 0.5)


def canny(img: np.ndarray, low: int, high: int) -> np.ndarray:
    """cv2.Canny(img, low, high) (3x3 Sobel, L1 magnitude) on (N, H, W) uint8 values -> bool.

    Integer numpy (faster than torch's int ops on CPU): Sobel with replicated borders,
    OpenCV's fixed-point sector test for the non-maximum suppression (only where the
    magnitude passes `low`), hysteresis as the 8-connected groups of candidates that hold
    a strong pixel."""
    n, h, w = img.shape
    p = np.pad(img.astype(np.int16), ((0, 0), (1, 1), (1, 1)), mode="edge")  # |Sobel| <= 1020
    diff = p[:, :, 2:] - p[:, :, :-2]  # (N, H+2, W)
    smooth = p[:, :, :-2] + 2 * p[:, :, 1:-1] + p[:, :, 2:]
    dx = diff[:, :-2] + 2 * diff[:, 1:-1] + diff[:, 2:]
    dy = smooth[:, 2:] - smooth[:, :-2]
    mp = np.zeros((n, h + 2, w + 2), dtype=np.int16)  # zero magnitude outside the image
    mag = mp[:, 1:-1, 1:-1]
    np.add(np.abs(dx), np.abs(dy), out=mag)
    cand = np.flatnonzero(mag > low)  # indices into (N, H, W)
    b, rem = np.divmod(cand, h * w)
    r, c = np.divmod(rem, w)
    at = (b * (h + 2) + r + 1) * (w + 2) + c + 1  # the same pixels in the padded array
    flat = mp.reshape(-1)
    m = flat[at]
    xs, ys = dx.reshape(-1)[cand].astype(np.int32), dy.reshape(-1)[cand].astype(np.int32)
    ax, ay = np.abs(xs), np.abs(ys) << 15
    tg22x = ax * _TG22
    horizontal = ay < tg22x
    vertical = ~horizontal & (ay > tg22x + (ax << 16))
    row = w + 2
    s = np.where((xs ^ ys) < 0, -1, 1)
    # neighbours before / after along the gradient: (0, -1)/(0, 1), (-1, 0)/(1, 0), or the diagonal
    before = np.where(horizontal, at - 1, np.where(vertical, at - row, at - row - s))
    after = np.where(horizontal, at + 1, np.where(vertical, at + row, at + row + s))
    mb, ma = flat[before], flat[after]
    peak = (m > mb) & np.where(horizontal | vertical, m >= ma, m > ma)
    maybe = np.zeros(n * h * w, dtype=bool)
    maybe[cand[peak]] = True
    maybe = maybe.reshape(n, h, w)
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # never across the batch axis
    labels, count = scipy.ndimage.label(maybe, structure=structure)
    keep = np.zeros(count + 1, dtype=bool)
    strong = cand[peak & (m > high)]
    keep[labels.reshape(-1)[strong]] = True
    keep[0] = False
    return keep[labels]


# cv2.DIST_L2 with a 5x5 mask (OpenCV 4.x/5.x: float32 sums of these weights)
_HV, _DIAG, _LONG = np.float32(1.0), np.float32(1.4), np.float32(2.1969)


def _run_min(row: np.ndarray, u: np.ndarray, ramp: np.ndarray) -> None:
    """row[:, j] = min(u[:, j], row[:, j-1] + 1) left to right, in place: the running minimum
    a * j + cummin(u - a * j), exact in float64, rounded once to float32 (OpenCV's scan
    rounds at each step: the two differ by at most an ulp where a run crosses a power of 2)."""
    row[:] = ramp + np.minimum.accumulate(u.astype(np.float64) - ramp, axis=1)


def _distance_truncated(edges: np.ndarray, cap: int) -> np.ndarray:
    """cv2.distanceTransform(~edges, DIST_L2, 5) truncated at `cap` pixels, float32 (N, H, W).

    OpenCV's two raster passes, a row at a time over the whole batch. Values are held at
    cap + 1 (paths only grow, so every distance <= cap is exact and the rest end >= cap)."""
    n, h, w = edges.shape
    hold = np.float32(cap + 1)
    t = np.full((n, h + 4, w + 4), hold, dtype=np.float32)  # outside the image: far
    zero = edges
    c = slice(2, w + 2)
    ramp = np.arange(w, dtype=np.float64)
    u, tmp = np.empty((n, w), np.float32), np.empty((n, w), np.float32)

    def col(row: np.ndarray, dx: int) -> np.ndarray:
        return row[:, 2 + dx:w + 2 + dx]

    def relax(near: np.ndarray, far: np.ndarray) -> None:
        """u = min(u, the mask's 7 moves from the next row and the one after). A pair of
        moves of one cost is min(a, b) + cost: float32 addition is monotone, so exact."""
        np.minimum(u, col(near, 0) + _HV, out=u)
        for row, dx, cost in ((near, 1, _DIAG), (near, 2, _LONG), (far, 1, _LONG)):
            np.minimum(col(row, -dx), col(row, dx), out=tmp)
            np.add(tmp, cost, out=tmp)
            np.minimum(u, tmp, out=u)

    for i in range(h):  # forward: rows above, then the left neighbour
        r = i + 2
        u.fill(hold)
        relax(t[:, r - 1], t[:, r - 2])
        u[zero[:, i]] = 0
        _run_min(t[:, r, c], u, ramp)
    for i in range(h - 1, -1, -1):  # backward: rows below, then the right neighbour
        r = i + 2
        u[:] = t[:, r, c]
        relax(t[:, r + 1], t[:, r + 2])
        _run_min(t[:, r, c][:, ::-1], u[:, ::-1], ramp)
    return np.minimum(t[:, 2:h + 2, c], np.float32(cap))


def _equalize(img: np.ndarray) -> np.ndarray:
    """cv2.equalizeHist on (N, H, W) integer images 0..255, per image (float32 values)."""
    n = img.shape[0]
    flat = img.reshape(n, -1).astype(np.int64)
    total = flat.shape[1]
    hist = np.bincount((flat + 256 * np.arange(n)[:, None]).ravel(), minlength=256 * n)
    hist = hist.reshape(n, 256)
    first = (hist > 0).argmax(axis=1)[:, None]  # (N, 1)
    h0 = np.take_along_axis(hist, first, axis=1)
    scale = np.float32(255.0) / np.maximum(total - h0, 1).astype(np.float32)  # OpenCV: float
    cum = np.maximum(hist.cumsum(axis=1) - h0, 0).astype(np.float32)
    lut = np.clip(np.round(cum * scale), 0, 255)  # saturate_cast<uchar>: round half to even
    lut = np.where(h0 == total, first.astype(np.float32), lut)  # one grey level: unchanged
    return np.take_along_axis(lut, flat, axis=1).reshape(img.shape)


def _water(liquid: np.ndarray, use_cv2: bool | None = None) -> np.ndarray:
    """The reference's water mask (N, H, W) float32 before its max-normalisation: the liquid
    layer's uint8 image times a shading from the distance to its Canny edges (distance
    truncated at 20, blurred, equalised, embossed with [[-2,-1,0],[-1,1,1],[0,1,2]], blurred).
    In cv2 where it is installed and agrees with numpy (`use_cv2=None`, `_cv2_agrees`), else in
    numpy; both give the same values."""
    # the reference's own cast: truncation, and a level above 1 (rare at these constants)
    # wraps around on x86 as numpy's float -> uint8 cast does there
    with np.errstate(invalid="ignore"):
        lu8 = (liquid * 255).astype(np.uint8)
    if use_cv2 is None:
        use_cv2 = cv2 is not None and _cv2_agrees()
    if use_cv2:
        cv2.setNumThreads(torch.get_num_threads())  # the caller's thread budget, as torch's
        shade = np.stack([_shade_cv2(im) for im in lu8])
    else:
        shade = _shade(lu8)
    return lu8.astype(np.float32) * shade  # (N, H, W)


@lru_cache(maxsize=1)
def _cv2_agrees() -> bool:
    """cv2 is importable and its shading equals the numpy steps' on a probe batch (liquid
    layers of 3 blurs at 48x40 and 24x24): another OpenCV release changing Canny or the
    distance transform falls back to numpy instead of changing the corruption."""
    rng = np.random.default_rng(0)
    for shape, sigma in (((2, 48, 40), 1.0), ((2, 48, 40), 2.5), ((2, 24, 24), 0.7)):
        liquid = scipy.ndimage.gaussian_filter(rng.normal(0.65, 0.3, shape), (0, sigma, sigma))
        liquid[liquid < 0.68] = 0
        u8 = (np.clip(liquid, 0, 1) * 255).astype(np.uint8)
        if not np.array_equal(_shade(u8), np.stack([_shade_cv2(im) for im in u8])):
            return False
    return True


def _shade(lu8: np.ndarray) -> np.ndarray:
    """_water's shading of (N, H, W) uint8 liquid layers in numpy: float32 levels 0..255."""
    dist = _distance_truncated(canny(lu8, 50, 150), 20)
    dist = np.floor((_box3(dist.astype(np.float64)) * (1.0 / 9.0)).astype(np.float32))  # cv2.blur, to uint8
    dist = _equalize(dist)
    n, h, w = dist.shape
    p = np.pad(dist.astype(np.int16), ((0, 0), (1, 1), (1, 1)), mode="reflect")

    def at(i: int, j: int) -> np.ndarray:
        return p[:, i:i + h, j:j + w]

    # cv2.filter2D with _EMBOSS (a correlation), saturated to uint8
    emb = 2 * (at(2, 2) - at(0, 0)) + (at(1, 2) + at(2, 1)) - (at(0, 1) + at(1, 0)) + at(1, 1)
    np.clip(emb, 0, 255, out=emb)
    return np.rint(_box3(emb) / np.float32(9)).astype(np.float32)  # cv2.blur on uint8 rounds (never a tie)


_EMBOSS = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float32)


def _shade_cv2(lu8: np.ndarray) -> np.ndarray:
    """_shade of one (H, W) uint8 layer in OpenCV: the reference's calls (its threshold at 20
    as a minimum, its integer emboss kernel as float32: the same values)."""
    dist = cv2.distanceTransform(255 - cv2.Canny(lu8, 50, 150), cv2.DIST_L2, 5)
    dist = cv2.blur(np.minimum(dist, np.float32(20)), (3, 3)).astype(np.uint8)
    dist = cv2.filter2D(cv2.equalizeHist(dist), cv2.CV_8U, _EMBOSS)
    return cv2.blur(dist, (3, 3)).astype(np.float32)


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
    liquid = _gaussian_nearest(noise, _pixels(sigma, h, w, side))
    liquid[liquid < threshold] = 0
    if mud == 0:
        m = _water(liquid)  # integer values >= 0: an all-zero mask stays zero (reference: NaN)
        m /= np.maximum(m.max(axis=(1, 2), keepdims=True), 1)
        m *= np.float32(amount)
        m = torch.from_numpy(m).to(x.device).unsqueeze(1)  # (N, 1, H, W)
        color = torch.tensor(_WATER, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        return torch.addcmul(x, m, color)
    m = _gaussian_nearest((liquid > threshold).astype(np.float32), _pixels(amount, h, w, side))
    m = torch.from_numpy(np.where(m < 0.8, np.float32(0), m)).to(x.device).unsqueeze(1)
    color = torch.tensor(_MUD, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    if x.device.type != "cpu":  # one launch per op on an accelerator
        return x * (1 - m) + color * m
    out = torch.empty_like(x)
    step = max(1, CACHE_VALUES // x[0].numel())  # cache-sized steps: the temporaries stay in cache
    for i in range(0, n, step):
        part = slice(i, i + step)
        torch.add(x[part] * (1 - m[part]), color * m[part], out=out[part])
    return out
