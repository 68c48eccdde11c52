"""Evaluation streams: which shards' rows an adaptation actor sees, in which order (no Ray).

The unit of work of `ttt-pipe adapt` is a STREAM: one actor runs it from start to end, one
engine, and writes one predictions file. Four kinds (`--stream`):

- ``iid`` — every shard is a stream of one, rows in stored order (the shards' rows are
  already in a seeded random order): exactly the pre-stream behaviour and bytes.
- ``continual`` — one stream per severity: that severity's domains (corruptions) one after
  the other in ``--order`` (default: the suite's standard order, `suite_order`), each
  domain's shards in name order. State is carried across domains (online); ``--reset domain``
  resets the engine at every domain boundary. The CTTA protocol of CoTTA (Wang et al., CVPR
  2022) and the "continual" setting of mariodoebler/test-time-adaptation
  (classification/test_time.py: `model.reset()` only before the first domain; domain order
  `_C.CORRUPTION.TYPE` in classification/conf.py, the same 15 names as `IMAGENET_C_ORDER`).
- ``mixed`` — one stream per severity: the rows of all its domains pooled and shuffled with
  a seeded permutation, so a batch mixes domains on purpose (Döbler's "mixed_domains").
- ``correlated`` — every shard is a stream whose rows are label-sorted with a Dirichlet
  concentration δ (`dirichlet_order`; TTAB's non-i.i.d. test case; for one-file domains
  Döbler's "reset_each_shift_correlated": sorted per domain, fresh model per domain).
  ``--dirichlet δ`` also applies to ``continual`` (each domain sorted on its own by Döbler's
  per-domain loader, state carried: his "correlated" setting, whose domain loop resets only
  before the first domain) and to ``mixed`` (the pooled rows sorted: his
  "mixed_domains_correlated").

Batches never straddle a SEGMENT: a shard (iid, correlated), a domain (continual; a domain's
rows may span several shard files, so a continual stream does not depend on --shard-size) or
the whole stream (mixed). Every order is a pure function of (seed, stream name, the shards'
row counts and labels), so a retried stream rewrites identical bytes.

Reset points (`ResetRule`, ``--reset never|domain|every:N``): the engine is always reset at
the stream's start; ``domain`` also at each domain boundary of a continual stream (and the
torch RNG is seeded there as at a stream start, so ``continual --reset domain`` equals
``iid`` for domains of one shard); ``every:N`` after every N batches of the stream (RDumb's
periodic reset, Press et al. 2023; Döbler's `MODEL.RESET_AFTER_NUM_UPDATES`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import TTTPipeError

__all__ = ["STREAM_KINDS", "STREAM_KEY", "StreamSettings", "IMAGENET_C_ORDER", "MNIST_C_ORDER", "ResetRule", "parse_reset",
           "StreamShard", "Segment", "StreamUnit", "suite_order", "resolve_order",
           "plan_streams", "stream_segments", "dirichlet_order", "order_seed",
           "DIRICHLET_DEFAULT", "label_runs"]

log = logging.getLogger(__name__)

STREAM_KINDS = ("iid", "continual", "mixed", "correlated")

# The ImageNet-C / RobustBench domain order: Hendrycks & Dietterich's 15 corruptions as
# RobustBench's `CORRUPTIONS` and Döbler's `_C.CORRUPTION.TYPE` (classification/conf.py) list
# them, then the 4 validation corruptions (speckle_noise, gaussian_blur, spatter, saturate,
# ImageNet-C's "extra" release) in imagecorruptions' order.
IMAGENET_C_ORDER = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
                    "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
                    "elastic_transform", "pixelate", "jpeg_compression",
                    "speckle_noise", "gaussian_blur", "spatter", "saturate")
# The grayscale suite's list: the seeds' gaussian_noise first (noise first, as in ImageNet-C),
# then MNIST-C's 15 in the order of its release (Mu & Gilmer 2019, google-research/mnist-c
# README; also this project's README and docs/corruptions.md).
MNIST_C_ORDER = ("gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur",
                 "shear", "scale", "rotate", "brightness", "translate", "stripe", "fog", "spatter",
                 "dotted_line", "zigzag", "canny_edges")

# δ when `--stream correlated` is given without `--dirichlet`: TTAB's default
# `--non_iid_ness 0.1` (parameters.py; exps/cifar10c.py) and Döbler's value for ImageNet-D109
# (classification/scripts/run.sh; 0.01 there for ImageNet-C).
DIRICHLET_DEFAULT = 0.1
# The rejection loop of the Dirichlet split (NOTE's dnn.py, kept by TTAB and Döbler) redraws
# until every chunk holds at least this many rows: Döbler 10 (`min_size_thresh`), TTAB 5. Ours
# is Döbler's 10, lowered to half the balanced chunk size N / (2 C) for short streams (a
# 16-row test shard could never reach 10 per chunk), and bounded by a number of draws instead
# of Döbler's 120 s wall clock (a deterministic failure, same message).
_MIN_CHUNK = 10
_MAX_DRAWS = 1000


STREAM_KEY = "ttt_pipe.stream"  # Parquet key-value metadata: the StreamSettings of a file


@dataclass(frozen=True)
class StreamSettings:
    """The stream settings stored with predictions (`STREAM_KEY`) and compared on resume.

    Kept apart from `jobs.shard_worker.AdaptSettings` so an iid run (all defaults) writes
    no key at all: its files keep their pre-stream bytes, and a file without the key reads
    as these defaults (older results folders still resume and finalise).
    """

    stream: str = "iid"
    order: str = ""                 # continual: the resolved domains in stream order
    reset: str = "never"            # never | domain | every:N
    dirichlet: float | None = None  # label-correlated order (None: not correlated)

    def metadata(self) -> dict[str, str]:
        """{STREAM_KEY: JSON} unless every field is at its default (then {})."""
        if self == StreamSettings():
            return {}
        return {STREAM_KEY: json.dumps(dataclasses.asdict(self), sort_keys=True)}

    @classmethod
    def from_metadata(cls, meta: dict) -> "StreamSettings":
        """From a file's decoded key-value metadata (str keys); defaults when absent."""
        raw = meta.get(STREAM_KEY)
        if not raw:
            return cls()
        values = json.loads(raw)
        return cls(**{f.name: values.get(f.name, f.default) for f in dataclasses.fields(cls)})

    def diff(self, other: "StreamSettings") -> list[str]:
        a, b = dataclasses.asdict(self), dataclasses.asdict(other)
        return [f"{k} {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k]]


def order_seed(seed: int, key: str) -> int:
    """A numpy seed per (run seed, key): independent of worker, order and other streams."""
    digest = hashlib.sha256(f"{seed}:order:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


@dataclass(frozen=True)
class ResetRule:
    """When the engine is reset inside a stream (it always is at the stream's start)."""

    kind: str = "never"   # never | domain | every
    every: int = 0        # N batches for kind "every"

    def __str__(self) -> str:
        return f"every:{self.every}" if self.kind == "every" else self.kind


def parse_reset(value: str | None) -> ResetRule:
    """`never`, `domain` or `every:N` (N >= 1 batches); one-line error otherwise."""
    text = "never" if value is None else str(value).strip()
    if text in ("never", "domain"):
        return ResetRule(text)
    if text.startswith("every:"):
        n = text[len("every:"):]
        if n.isdigit() and int(n) >= 1:
            return ResetRule("every", int(n))
    raise TTTPipeError(f"--reset must be never, domain or every:N with N >= 1 batches, got {value!r}")


@dataclass(frozen=True)
class StreamShard:
    """What planning needs of one shard (from its footer)."""

    uri: str
    name: str
    corruption: str
    severity: int
    rows: int


@dataclass(frozen=True)
class Segment:
    """A run of a stream's rows that batches do not straddle: (shard index, row) pairs in
    stream order. `domain_start`: a domain begins here (continual), a `--reset domain` point."""

    shard_index: np.ndarray  # (n,) int32 index into StreamUnit.shards
    row: np.ndarray          # (n,) int64 row within that shard
    domain_start: bool = True

    def __len__(self) -> int:
        return len(self.row)


@dataclass(frozen=True)
class StreamUnit:
    """One stream: its name (= its predictions file's stem), kind and shards in order."""

    name: str
    kind: str
    shards: tuple[StreamShard, ...]
    dirichlet: float | None = None
    domains: tuple[str, ...] = field(default=())  # corruptions in stream order

    @property
    def samples(self) -> int:
        return sum(s.rows for s in self.shards)


def suite_order(suite: str, present: Sequence[str]) -> list[str]:
    """The default domain order of `suite` restricted to `present`; names the list lacks
    (identity, anything new) follow in sorted order (identity first: the clean domain)."""
    standard = MNIST_C_ORDER if suite == "mnist-c" else IMAGENET_C_ORDER
    present = set(present)
    head = [c for c in ("identity", *standard) if c in present]
    return head + sorted(present - set(head))


def resolve_order(order: str | None, suite: str, present: Sequence[str], known: Sequence[str]) -> list[str]:
    """`--order` (comma list, or None for the suite's order) -> the domains of the stream.

    Unknown names are an error (`known`: the suite's names); names with no shards are skipped
    with one log line; shards of a corruption the list leaves out are an error (they would
    get no predictions), except identity (severity 0, always a stream of its own: first).
    """
    if order is None or not str(order).strip():
        return suite_order(suite, present)
    names = [n.strip() for n in str(order).split(",") if n.strip()]
    unknown = [n for n in names if n not in known and n != "identity"]
    if unknown:
        raise TTTPipeError(f"--order names unknown corruption(s) {', '.join(unknown)}; the {suite} "
                           f"suite has: {', '.join(known)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise TTTPipeError(f"--order repeats {', '.join(repeated)}; name each corruption once")
    absent = [n for n in names if n not in present]
    if absent:
        log.info("--order: no shards of %s; skipped", ", ".join(absent))
    if "identity" in present and "identity" not in names:
        names = ["identity", *names]  # the clean baseline: severity 0, a stream of its own
    left_out = sorted(set(present) - set(names))
    if left_out:
        raise TTTPipeError(f"--order leaves out {', '.join(left_out)}, which the shards hold; "
                           "add them to --order or leave their shards out of --shards")
    return [n for n in names if n in present]


def plan_streams(kind: str, shards: Sequence[StreamShard], order: Sequence[str] = (),
                 dirichlet: float | None = None) -> list[StreamUnit]:
    """The streams of a run (names sorted), given shards and the resolved domain order.

    iid: one per shard, named after it (today's file names). correlated: one per shard,
    ``correlated-<shard>``. continual / mixed: one per severity, ``continual-s<sev>`` /
    ``mixed-s<sev>``; shards in (domain order, name) order.
    """
    if kind not in STREAM_KINDS:
        raise TTTPipeError(f"unknown stream {kind!r}; choose from: {', '.join(STREAM_KINDS)}")
    if kind in ("iid", "correlated"):
        prefix = "" if kind == "iid" else "correlated-"
        units = [StreamUnit(f"{prefix}{s.name}", kind, (s,), dirichlet, (s.corruption,)) for s in shards]
        return sorted(units, key=lambda u: u.name)
    rank = {c: i for i, c in enumerate(order)}
    by_severity: dict[int, list[StreamShard]] = {}
    for s in shards:
        by_severity.setdefault(s.severity, []).append(s)
    units = []
    for severity, group in sorted(by_severity.items()):
        group = sorted(group, key=lambda s: (rank.get(s.corruption, len(rank)), s.name))
        domains = tuple(dict.fromkeys(s.corruption for s in group))
        units.append(StreamUnit(f"{kind}-s{severity}", kind, tuple(group), dirichlet, domains))
    return units


def stream_segments(unit: StreamUnit, seed: int,
                    labels: Callable[[int], np.ndarray] | None = None) -> list[Segment]:
    """The stream's rows in order, as segments. `labels(i)` gives shard i's labels (int64)
    when a Dirichlet order needs them (the actor reads the label column only)."""
    sizes = [s.rows for s in unit.shards]

    def pooled(indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        shard = np.concatenate([np.full(sizes[i], i, np.int32) for i in indices])
        row = np.concatenate([np.arange(sizes[i], dtype=np.int64) for i in indices])
        return shard, row

    def ordered(shard, row, key: str):
        rng = np.random.default_rng(order_seed(seed, key))
        if unit.dirichlet is None:
            return shard, row
        if labels is None:
            raise TTTPipeError(f"stream {unit.name} needs labels for its Dirichlet order")
        lab = np.concatenate([labels(i) for i in sorted(set(shard.tolist()))])
        # `lab` follows pooled order (indices ascending within a segment, as built below)
        if len(lab) != len(row):
            raise TTTPipeError(f"stream {unit.name}: {len(lab)} labels for {len(row)} rows; "
                               "a shard changed since the run was planned, rerun")
        perm = dirichlet_order(lab, unit.dirichlet, rng, unit.name)
        return shard[perm], row[perm]

    if unit.kind in ("iid", "correlated"):
        return [Segment(*ordered(*pooled([0]), unit.name))]
    if unit.kind == "mixed":
        shard, row = pooled(range(len(sizes)))
        if unit.dirichlet is None:
            perm = np.random.default_rng(order_seed(seed, unit.name)).permutation(len(row))
            shard, row = shard[perm], row[perm]
        else:
            shard, row = ordered(shard, row, unit.name)
        return [Segment(shard, row)]
    segments = []
    for domain in unit.domains:  # continual: shards are grouped by domain, in order
        indices = [i for i, s in enumerate(unit.shards) if s.corruption == domain]
        segments.append(Segment(*ordered(*pooled(indices), f"{unit.name}:{domain}")))
    return segments


def dirichlet_order(labels: np.ndarray, delta: float, rng: np.random.Generator,
                    what: str = "the stream") -> np.ndarray:
    """A label-correlated order of `labels` (a permutation of its indices).

    The non-i.i.d. sampler of NOTE (Gong et al., NeurIPS 2022, learner/dnn.py), as kept by
    TTAB (ttab/loads/define_dataset.py `_intra_non_iid_shift`, pattern
    "class_wise_over_domain") and by Döbler (classification/datasets/data_loading.py
    `sort_by_dirichlet`): C = max(label) + 1 chunks; each class's rows (shuffled) are split
    over the chunks with proportions ~ Dirichlet(δ, ..., δ), a chunk that already holds N / C
    rows getting no more ("balance"); redrawn until every chunk has `_MIN_CHUNK` rows (see
    there); then the chunks one after another, inside each its classes in a random order.
    Small δ: long runs of one class; large δ: close to i.i.d. δ = 0 is Döbler's plain label
    sort (`samples.sort(key=label)` after the shuffle: classes ascending, random inside).
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    shuffled = rng.permutation(n)
    if delta == 0:
        return shuffled[np.argsort(labels[shuffled], kind="stable")]
    classes = int(labels.max()) + 1 if n else 0
    min_chunk = min(_MIN_CHUNK, n // (2 * classes)) if classes else 0
    for _ in range(_MAX_DRAWS):
        chunks: list[list[np.ndarray]] = [[] for _ in range(classes)]  # chunk -> per-class rows
        sizes = np.zeros(classes, dtype=np.int64)
        for k in range(classes):
            idx_k = np.flatnonzero(labels == k)
            rng.shuffle(idx_k)
            p = rng.dirichlet(np.full(classes, float(delta)))
            p = p * (sizes < n / classes)  # balance: full chunks take no more
            p = p / p.sum()
            cuts = (np.cumsum(p) * len(idx_k)).astype(int)[:-1]
            for j, part in enumerate(np.split(idx_k, cuts)):
                chunks[j].append(part)
                sizes[j] += len(part)
        if sizes.min() >= min_chunk:
            break
    else:
        raise TTTPipeError(f"could not build a label-correlated order of {what} with --dirichlet "
                           f"{delta:g} in {_MAX_DRAWS} draws; try a larger --dirichlet")
    out = []
    for chunk in chunks:
        for k in rng.permutation(classes):
            out.append(chunk[k])
    return np.concatenate(out) if out else np.empty(0, np.int64)


def label_runs(labels: np.ndarray) -> float:
    """Mean length of the runs of equal consecutive labels (1.0: no two neighbours agree)."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        return 0.0
    return len(labels) / (1 + int(np.count_nonzero(labels[1:] != labels[:-1])))
