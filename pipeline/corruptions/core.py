"""The corruption registry, the per-sample random streams and the `corrupt` entry point.

A corruption is a function `fn(x, rngs, norm_std, **params) -> (N, 28, 28)` over a batch
`x` (N, 28, 28) float32 in pixel units, with `rngs` one `numpy.random.Generator` per sample.
Each sample's generator is seeded from (seed, crc32(name), severity, sample_id) alone, and
the maths is element-wise or per-image (scipy.ndimage filters with no mixing across the
batch axis), so a sample's output never depends on the other samples in its batch.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.corruptions.table import MNIST_C, SEVERITY_TABLE
from pipeline.errors import TTTPipeError

__all__ = [
    "SEVERITIES", "IMAGE_SIZE", "Corruption", "CORRUPTIONS", "register", "corrupt",
    "get_corruption", "list_corruptions", "list_validation_corruptions", "parse_corruptions",
    "parse_severities",
    "sample_rngs", "draw",
]

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
IMAGE_SIZE = 28
_CHUNK = 4096  # samples per vectorised step: bounds memory, never changes results

CorruptionFn = Callable[..., np.ndarray]


@dataclass(frozen=True)
class Corruption:
    """A named corruption, its parameters at severities 1..5 and its output range."""

    name: str
    fn: CorruptionFn
    summary: str
    clip: bool  # output clipped to [0, 1]
    random: bool  # draws from the per-sample generators
    validation: bool = False  # held out for choosing settings, never reported (see register)

    @property
    def table(self) -> dict[str, tuple[float, ...]]:
        return SEVERITY_TABLE[self.name]

    @property
    def mnist_c(self) -> str:
        return MNIST_C[self.name]

    @property
    def output_range(self) -> str:
        return "[0, 1]" if self.clip else "unbounded"

    def params(self, severity: int) -> dict[str, float]:
        return {key: values[severity - 1] for key, values in self.table.items()}


CORRUPTIONS: dict[str, Corruption] = {}


def register(name: str, summary: str, *, clip: bool = True, random: bool = True,
             validation: bool = False):
    """Register `fn` under `name`; its parameters come from `SEVERITY_TABLE[name]`.

    validation=True marks a corruption kept for choosing settings (as ImageNet-C keeps
    speckle_noise, gaussian_blur, spatter, saturate, Hendrycks & Dietterich 2019): it is left
    out of `list_corruptions()` and therefore of "all", and is selected by name or "validation".
    """

    def deco(fn: CorruptionFn) -> CorruptionFn:
        if name not in SEVERITY_TABLE or name not in MNIST_C:
            raise KeyError(f"corruption {name!r} has no row in pipeline/corruptions/table.py")
        CORRUPTIONS[name] = Corruption(name, fn, summary, clip, random, validation)
        return fn

    return deco


def list_corruptions(include_identity: bool = False, include_validation: bool = False) -> list[str]:
    """Registered corruption names, sorted: the reporting suite ("all"); `identity` and the
    validation corruptions only when asked for."""
    return sorted(n for n, c in CORRUPTIONS.items()
                  if (include_identity or n != "identity") and (include_validation or not c.validation))


def list_validation_corruptions() -> list[str]:
    """The corruptions held out for choosing settings ("validation"), sorted."""
    return sorted(n for n, c in CORRUPTIONS.items() if c.validation)


def get_corruption(name: str) -> Corruption:
    try:
        return CORRUPTIONS[name]
    except KeyError:
        raise TTTPipeError(
            f"unknown corruption {name!r}; choose from: "
            f"{', '.join(list_corruptions(include_identity=True))} (or 'all'); for tuning: "
            f"{', '.join(list_validation_corruptions())} (or 'validation')"
        ) from None


def parse_corruptions(spec: str | Iterable[str]) -> list[str]:
    """`"all"` -> the reporting suite (no identity, no validation corruption); `"validation"`
    -> the validation corruptions; `"a,b"` -> [a, b] (validated, de-duplicated)."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s) for s in spec]
    names = [n for n in names if n]
    if not names:
        raise TTTPipeError("no corruption given; pass names like 'gaussian_noise,fog' or 'all'")
    out: list[str] = []
    for n in names:
        chosen = (list_corruptions() if n == "all" else list_validation_corruptions()
                  if n == "validation" else [get_corruption(n).name])
        out.extend(c for c in chosen if c not in out)
    return out


def parse_severities(spec: str | Iterable[int]) -> list[int]:
    """`"1,3,5"` -> [1, 3, 5]; `"all"` -> [1, 2, 3, 4, 5]. Valid severities are 1-5."""
    parts = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    parts = [p for p in parts if p != ""]
    if not parts:
        raise TTTPipeError("no severity given; pass severities like '1,3,5' (valid: 1-5) or 'all'")
    out: list[int] = []
    for p in parts:
        if p == "all":
            chosen = list(SEVERITIES)
        else:
            try:
                chosen = [int(p)]
            except (TypeError, ValueError):
                raise TTTPipeError(f"bad severity {p!r}; use integers 1-5 like '1,3,5' or 'all'") from None
            if chosen[0] not in SEVERITIES:
                raise TTTPipeError(f"severity {chosen[0]} is out of range; valid severities are 1-5")
        out.extend(s for s in chosen if s not in out)
    return out


def sample_rngs(seed: int, name: str, severity: int, sample_ids: Sequence[int]) -> list[np.random.Generator]:
    """One generator per sample, seeded from (seed, crc32(name), severity, sample_id)."""
    key = zlib.crc32(name.encode())
    return [np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, key, severity, int(i)])))
            for i in sample_ids]


def draw(rngs: Sequence[np.random.Generator], fn: Callable[[np.random.Generator], np.ndarray]) -> np.ndarray:
    """Stack `fn(rng)` over the samples' generators: (N, ...)."""
    return np.stack([np.asarray(fn(g)) for g in rngs])


def check_ids_and_seed(sample_ids, n: int, seed) -> np.ndarray:
    """`sample_ids` as an array of `n` non-negative integers and a non-negative integer `seed`,
    or a one-line TTTPipeError (every suite's corrupt() checks these the same way)."""
    ids = np.asarray(sample_ids)
    if ids.shape != (n,) or (len(ids) and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0)):
        raise TTTPipeError(f"sample_ids must be {n} non-negative integers (one per image), "
                           f"got shape {ids.shape} dtype {ids.dtype}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise TTTPipeError(f"seed must be a non-negative integer, got {seed!r}")
    return ids


def _check_inputs(images, sample_ids, seed, norm_std) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[1:] != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise TTTPipeError(f"corrupt() needs images shaped (N, 1, 28, 28), got {x.shape}; "
                           "convert with pipeline.datasets.to_float")
    if not np.issubdtype(x.dtype, np.floating):
        raise TTTPipeError(f"corrupt() needs float pixel-unit images, got dtype {x.dtype}; "
                           "convert with pipeline.datasets.to_float")
    ids = check_ids_and_seed(sample_ids, len(x), seed)
    if not np.isfinite(norm_std) or norm_std <= 0:
        raise TTTPipeError(f"norm_std must be positive (the dataset's normalisation std), got {norm_std!r}")
    return x, ids


def corrupt(images: np.ndarray, name: str, severity: int, sample_ids: Sequence[int],
            seed: int, norm_std: float) -> np.ndarray:
    """Corrupt a batch of pixel-unit images (N, 1, 28, 28) -> float32 (N, 1, 28, 28).

    Deterministic per (seed, name, severity, sample_id). `identity` ignores `severity`;
    every other corruption takes severity 1-5. The input is never modified.
    """
    spec = get_corruption(name)
    x, ids = _check_inputs(images, sample_ids, seed, norm_std)
    if name == "identity":
        return x.astype(np.float32, copy=True)
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise TTTPipeError(f"severity {severity!r} is out of range for {name}; valid severities are 1-5")
    severity = int(severity)
    params = spec.params(severity)
    out = np.empty(x.shape, dtype=np.float32)
    for start in range(0, len(x), _CHUNK):
        part = slice(start, start + _CHUNK)
        batch = x[part, 0].astype(np.float32, copy=True)  # (n, 28, 28)
        rngs = sample_rngs(seed, name, severity, ids[part]) if spec.random else []
        y = spec.fn(batch, rngs, norm_std=float(norm_std), **params)
        if spec.clip:
            y = np.clip(y, 0.0, 1.0)
        out[part, 0] = y
    return out
