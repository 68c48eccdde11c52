"""`ttt-pipe adapt`: stream corrupted shards through test-time adaptation on a pool of Ray actors.

Design
------
- The unit of work is a WHOLE SHARD (`jobs.shard_worker`): an actor reads it, adapts it batch
  by batch in order and writes `RESULTS/predictions/<shard>.parquet` atomically (temp file +
  rename). Batches never straddle shards (a shard holds one corruption and severity), batch
  boundaries are fixed by `batch_size`, online mode resets at each shard start and torch is
  seeded from (seed, shard), so a shard's predictions do not depend on the actor count, the
  order, or retries: a retried call rewrites identical bytes.
- Streams (`--stream`, `pipeline.streams`): more generally the unit is a STREAM that one
  actor runs from start to end with one engine. `iid` (the default) makes every shard a
  stream of one: exactly the shard path above, same files and bytes. `continual` (one stream
  per severity, domains in `--order`; online unless `--mode` says otherwise), `mixed` (one
  per severity, domains shuffled together) and `correlated` (one per shard, label-sorted with
  a Dirichlet concentration) write `RESULTS/predictions/<stream>.parquet` with `stream` and
  `position` columns (`jobs.stream_worker`). `--reset never|domain|every:N` (default never:
  each stream starts fresh, nothing else) and `--dirichlet` are checked here before any Ray
  work; the resolved stream settings (kind, order, reset, dirichlet) are stored with every
  file (only when not the iid defaults) and compared on resume like the others. Streams of one
  run (severities, shards) run in parallel on the pool; a stream whose file is missing is
  redone whole. `--save-adapted DIR` writes each online stream's final weights to
  `DIR/<stream>/` (a checkpoint), refused for episodic runs.
- A pool of N actors (`jobs.pool`), each loading the checkpoint once (from its path, which
  every node must be able to read, like the shards and the results folder) onto its device; `max_restarts=-1, max_task_retries=-1` restart a dead actor
  and retry its shard. The driver hands shards to idle actors as they free up.
- Resume: shards whose predictions file exists are skipped, after checking that the file was
  made with the same settings (checkpoint sha256, method, steps, lr, batch size, mode, seed,
  episodes, protocol, copies, --method-config, EATA's Fisher data and sample count: stored in
  each file's metadata; a key older files lack counts as its default). Stale hidden temp
  files of killed writers are removed.
- Only complete files ever appear: `run.json` is written (atomically) after validation and
  before any Ray work, `accuracy.parquet` is deleted when shards are pending and rewritten at
  the end. The driver never loads predictions: each actor checks exactly one row per
  (sample, step) in its shard and writes the shard's summary (per step n, correct) into the
  predictions file's footer; `finalize_results` reads footers only, checks each row count
  against its summary and the shard's samples (a mismatch fails loudly and writes nothing)
  and sums the summaries into accuracy.parquet.
- Threads: each actor uses `floor(cpus_per_actor)` torch threads, independent of the actor
  count. CPU reductions in torch's backward depend on the thread count, so predictions are
  bit-identical across actor counts, restarts and reruns for a fixed `--cpus-per-actor`.
  Actors also run with `MKL_CBWR=AUTO` (`jobs.pool.actor_env`): MKL's kernels are otherwise
  not reproducible from one process to the next, and Adam amplifies the last bits.
  Actors ask Ray for `cpus_per_actor` CPUs, or a fraction so that the pool fits the cluster.
  Actors read and write their own files: there are no extra Ray tasks to starve.
- The method (`--method`, default the checkpoint's; `pipeline.methods`): ttt/it3 adapt only
  their own joint checkpoint; every method without joint training adapts any checkpoint's
  model (its engine is built once in the driver as a check, then by each actor; EATA's Fisher
  is computed in the actor from clean images whose location the driver checked).
- Everything that needs no pixels is validated before Ray starts: the checkpoint (missing,
  truncated, tampered), the method and its config, every shard from its Parquet footer only
  (schema, empty, other dataset or image shape than the checkpoint's, duplicate names, an id
  range too small for the rows), the numbers and the results folder. The content checks
  (NaN pixels, duplicate sample ids, mixed corruption values) run in the actor that reads
  the shard and fail the run with the shard's name: the driver never reads image payloads.
- Test hook: `TTT_PIPE_TEST_KILL_ONCE=<marker path>` makes the first actor that creates the
  marker `os._exit(1)` after its first batch (the pool must recover).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from engines.config import GATES
from jobs.pool import PoolPlan, parse_actors, plan_pool, run_pool
from jobs.shard_worker import MODES, PROTOCOLS, SETTINGS_KEY, AdaptSettings
from pipeline import storage
from pipeline.cost import COST_FILE, read_costs
from pipeline.checkpoint import (MANIFEST_NAME, Checkpoint, check_adaptable, checkpoint_image_shape,
                                 load_checkpoint, model_sha256)
from pipeline.model_spec import trusted_modules
from pipeline.errors import TTTPipeError
from pipeline.methods import (FISHER_TRAIN, FisherSource, MethodChoice, check_method_engine,
                              resolve_fisher, resolve_method)
from pipeline.results import (ACCURACY_FILE, PREDICTIONS_DIR, RUN_FILE, SUMMARY_KEY,
                              accuracy_from_summaries, predictions_uri, shard_name,
                              summarize_predictions)
from pipeline.shards import list_shards, read_shard_footer
from pipeline.streams import (DIRICHLET_DEFAULT, STREAM_KEY, STREAM_KINDS, StreamSettings, StreamShard,
                              StreamUnit, parse_reset, plan_streams, resolve_order)

__all__ = ["AdaptRequest", "AdaptPlan", "ShardInfo", "AdaptOutcome", "KILL_ENV",
           "prepare_adapt", "run_adapt", "finalize_results"]

log = logging.getLogger(__name__)

KILL_ENV = "TTT_PIPE_TEST_KILL_ONCE"
_WHERE_KEYS = ("fisher_dir",)  # settings that say where data is, not what: not compared on resume
_SHARD_FIX = "regenerate it with ttt-pipe corrupt or import-corrupted"


@dataclass(frozen=True)
class AdaptRequest:
    """What the user asked for; `None` means "the checkpoint's default"."""

    checkpoint: str
    shards: str
    out: str
    steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    mode: str | None = None
    actors: int | str | None = None  # N, or "MIN:MAX" (a pool that grows with the cluster)
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    seed: int = 0
    address: str | None = None
    method: str | None = None
    trust_model: str | None = None  # comma list of modules a model import path may come from
    episodes: int = 1
    protocol: str = "batch"
    copies: int = 32
    gate: str | None = None
    method_config: str | dict | None = None  # JSON object of the method's config fields
    fisher_data: str | None = None      # EATA: "train" (default) or clean shards
    fisher_samples: int | None = None   # EATA: clean images for the Fisher (default 2000)
    data_dir: str | None = None         # where "train" is searched (then $TTT_PIPE_DATA, cache)
    stream: str = "iid"             # iid | continual | mixed | correlated (pipeline.streams)
    order: str | None = None        # continual: comma list of corruptions [the suite's order]
    reset: str | None = None        # never | domain | every:N [never]
    dirichlet: float | None = None  # label-correlated order [0.1 for correlated, else none]
    save_adapted: str | None = None  # folder: each stateful stream's final weights, a checkpoint


@dataclass(frozen=True)
class ShardInfo:
    uri: str
    name: str  # file stem: names RESULTS/predictions/<name>.parquet (iid)
    corruption: str
    severity: int
    samples: int
    done: bool
    labelled: bool = True
    suite: str = ""


@dataclass
class AdaptPlan:
    request: AdaptRequest
    checkpoint: Checkpoint
    settings: AdaptSettings
    shards: list[ShardInfo]
    validate_s: float = 0.0
    units: list[StreamUnit] = field(default_factory=list)  # the streams (iid: one per shard)
    done_units: frozenset = frozenset()
    stream: StreamSettings = field(default_factory=StreamSettings)

    @property
    def pending(self) -> list[ShardInfo]:
        return [s for s in self.shards if not s.done]

    @property
    def pending_units(self) -> list[StreamUnit]:
        return [u for u in self.units if u.name not in self.done_units]


@dataclass
class AdaptOutcome:
    plan: AdaptPlan
    accuracy: pa.Table
    timings: dict = field(default_factory=dict)
    pool: PoolPlan | None = None
    shard_summaries: list[dict] = field(default_factory=list)


def _check_numbers(req: AdaptRequest) -> None:
    parse_actors(req.actors)
    for name, value, lo in (("steps", req.steps, 0), ("batch_size", req.batch_size, 1),
                            ("seed", req.seed, 0), ("episodes", req.episodes, 1),
                            ("copies", req.copies, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < lo):
            raise TTTPipeError(f"--{name.replace('_', '-')} must be an integer >= {lo}, got {value!r}")
    if req.lr is not None and not (isinstance(req.lr, (int, float)) and req.lr > 0 and np.isfinite(req.lr)):
        raise TTTPipeError(f"--lr must be a number > 0, got {req.lr!r}")
    if not req.cpus_per_actor > 0:
        raise TTTPipeError(f"--cpus-per-actor must be > 0, got {req.cpus_per_actor!r}")
    if not req.gpus_per_actor >= 0:
        raise TTTPipeError(f"--gpus-per-actor must be >= 0, got {req.gpus_per_actor!r}")
    if req.mode is not None and req.mode not in MODES:
        raise TTTPipeError(f"unknown mode {req.mode!r}; choose from: {', '.join(MODES)}")
    if req.gate is not None and req.gate not in GATES:
        raise TTTPipeError(f"unknown gate {req.gate!r}; choose from: {', '.join(GATES)}")
    if req.protocol not in PROTOCOLS:
        raise TTTPipeError(f"unknown protocol {req.protocol!r}; choose from: {', '.join(PROTOCOLS)}")


def _absolute(uri: str) -> str:
    """Local paths made absolute: actors do not share the driver's working directory."""
    return str(uri) if storage.is_uri(uri) else os.path.abspath(os.path.expanduser(str(uri)))


def _absolute_paths(req: AdaptRequest) -> AdaptRequest:
    paths = {k: _absolute(getattr(req, k)) for k in ("checkpoint", "shards", "out")}
    for key in ("data_dir", "fisher_data"):  # optional; "train" is a name, not a path
        value = getattr(req, key)
        if value is not None and not (key == "fisher_data" and value == FISHER_TRAIN):
            paths[key] = _absolute(value)
    return dataclasses.replace(req, **paths)


def _settings(req: AdaptRequest, ckpt: Checkpoint, choice: MethodChoice,
              fisher: FisherSource) -> AdaptSettings:
    """The settings of this run: the flags, else the method's resolved config (the checkpoint's
    own when it is the checkpoint's method, else the method's defaults; `pipeline.methods`)."""
    config = choice.config

    def pick(value, key):
        if value is not None:
            return value
        if key not in config:
            raise TTTPipeError(f"method {choice.name} has no default {key!r} in its config; "
                               f"pass --{key.replace('_', '-')}")
        return config[key]

    return AdaptSettings(method=choice.name, weights_sha256=ckpt.manifest["weights_sha256"],
                         steps=int(pick(req.steps, "steps")), lr=float(pick(req.lr, "lr")),
                         batch_size=int(pick(req.batch_size, "batch_size")),
                         mode=str(req.mode or config.get("mode", "episodic")), seed=int(req.seed),
                         episodes=int(req.episodes), protocol=req.protocol,
                         copies=int(req.copies) if req.protocol == "per-sample" else 0,
                         gate=str(req.gate or config.get("gate", "none")),
                         method_config=json.dumps(choice.overrides, sort_keys=True),
                         fisher_data=fisher.data, fisher_samples=int(fisher.samples),
                         fisher_dir=fisher.data_dir or "")


def _settings_diff(theirs: dict, settings: AdaptSettings) -> list[str]:
    """How settings stored with predictions differ from ours; a key an older ttt-pipe did not
    write counts as its default (so older results folders still resume and finalize)."""
    ours = {k: v for k, v in dataclasses.asdict(settings).items() if k not in _WHERE_KEYS}
    defaults = {f.name: f.default for f in dataclasses.fields(AdaptSettings)}
    theirs = {k: theirs.get(k, defaults[k]) for k in ours}
    return [f"{k} {theirs[k]!r} vs {ours[k]!r}" for k in ours if theirs[k] != ours[k]]


def _stream_settings(req: AdaptRequest, settings: AdaptSettings) -> tuple[AdaptSettings, StreamSettings]:
    """Check --stream/--reset/--dirichlet/--save-adapted (no shards needed yet) and fold them
    into the settings. A continual stream is online unless --mode says otherwise (state is
    carried across its domains); every other stream keeps the checkpoint's mode."""
    kind = req.stream
    if kind not in STREAM_KINDS:
        raise TTTPipeError(f"unknown stream {kind!r}; choose from: {', '.join(STREAM_KINDS)}")
    reset = parse_reset(req.reset)
    delta = req.dirichlet
    if delta is not None and (isinstance(delta, bool) or not isinstance(delta, (int, float))
                              or not np.isfinite(delta) or delta < 0):
        raise TTTPipeError(f"--dirichlet must be a number >= 0 (0: sorted by label), got {delta!r}")
    if kind == "iid" and delta is not None:
        raise TTTPipeError("--dirichlet orders rows by label: use --stream correlated (per shard), "
                           "continual or mixed with it, not iid")
    if kind == "correlated" and delta is None:
        delta = DIRICHLET_DEFAULT
    if req.order is not None and kind != "continual":
        raise TTTPipeError(f"--order sets the domain order of --stream continual; {kind} streams "
                           "have none (leave --order out)")
    if reset.kind == "domain" and kind == "mixed":
        raise TTTPipeError("--reset domain: a mixed stream has no domain boundaries (its batches mix "
                           "domains); use --reset never or every:N")
    if reset.kind == "domain" and kind != "continual":
        raise TTTPipeError(f"--reset domain resets at the domain boundaries of --stream continual; an "
                           f"{kind} stream holds one domain (it is reset at its start anyway): "
                           "use --stream continual, or --reset never or every:N")
    chosen = req.mode is not None or "mode" in json.loads(settings.method_config)  # --mode or
    mode = settings.mode if chosen or kind != "continual" else "online"         # --method-config's
    if mode == "episodic" and reset.kind != "never":
        raise TTTPipeError(f"--reset {reset} needs --mode online: episodic mode resets after every batch")
    if mode == "episodic" and req.save_adapted:
        raise TTTPipeError("--save-adapted saves the weights a stream ends with, but episodic mode "
                           "restores them after every batch (nothing carries); use --mode online")
    if mode == "online" and (settings.episodes > 1 or settings.protocol == "per-sample"):
        raise TTTPipeError("--episodes > 1 and --protocol per-sample adapt independent episodes; "
                           "use --mode episodic (or --episodes 1 --protocol batch for online)")
    return (dataclasses.replace(settings, mode=mode),
            StreamSettings(stream=kind, reset=str(reset), dirichlet=None if delta is None else float(delta)))


def _plan_units(req: AdaptRequest, settings: StreamSettings, infos: list[ShardInfo]):
    """The run's streams and the settings with the resolved domain order (continual)."""
    from pipeline.corruptions.suites import suite_names

    if settings.dirichlet is not None:
        unlabelled = [s.name for s in infos if not s.labelled]
        if unlabelled:
            raise TTTPipeError(f"--stream {settings.stream} with --dirichlet sorts rows by label, but shard "
                               f"{unlabelled[0]} is unlabelled; use --stream iid, continual or mixed "
                               "without --dirichlet")
    order: list[str] = []
    if settings.stream == "continual":
        suite = infos[0].suite or "mnist-c"
        order = resolve_order(req.order, suite, sorted({s.corruption for s in infos}),
                              suite_names(suite))
        settings = dataclasses.replace(settings, order=",".join(order))
    shards = [StreamShard(uri=s.uri, name=s.name, corruption=s.corruption, severity=s.severity,
                          rows=s.samples) for s in infos]
    return plan_streams(settings.stream, shards, order, settings.dirichlet), settings


def unit_uri(out: str, unit: str) -> str:
    """Where a stream's predictions live (an iid stream's name is its shard's: today's file)."""
    return storage.join(str(out), PREDICTIONS_DIR, f"{unit}.parquet")


def _check_existing(uri: str, name: str, settings: AdaptSettings,
                    stream: StreamSettings = StreamSettings()) -> None:
    """A predictions file found on resume must come from the same settings (stream ones too:
    a file without them is an iid file of the default stream settings)."""
    fs, path = storage.resolve(uri)
    try:
        meta = pq.read_schema(path, filesystem=fs).metadata or {}
        theirs = json.loads(meta.get(SETTINGS_KEY.encode(), b"{}"))
        their_stream = StreamSettings.from_metadata({k.decode(): v.decode() for k, v in meta.items()})
    except (pa.ArrowException, OSError, ValueError, TypeError) as exc:
        raise TTTPipeError(f"cannot read existing predictions {uri} ({exc}); delete it and rerun") from None
    diff = _settings_diff(theirs, settings) + their_stream.diff(stream)
    if diff:
        raise TTTPipeError(
            f"predictions for shard {name} in the results folder were made with other settings "
            f"({'; '.join(diff)}); use a new --out or delete that folder")


def _covered_shards(uri: str) -> set[str]:
    """The shards a predictions file holds rows of, from its footer summary (no rows read)."""
    fs, path = storage.resolve(uri)
    try:
        meta = pq.read_schema(path, filesystem=fs).metadata or {}
        summary = json.loads(meta.get(SUMMARY_KEY.encode(), b"{}"))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise TTTPipeError(f"cannot read existing predictions {uri} ({exc}); delete it and rerun") from None
    return set(summary.get("shards") or ()) | ({summary["shard"]} if summary.get("shard") else set())


def _check_foreign_predictions(out: str, units) -> None:
    """A predictions file that is not one of this run's units but holds rows of its shards
    (another --stream, e.g. continual after iid, into the same --out) would count those samples
    twice in accuracy and the report: refused. Files of other shards may share the folder."""
    folder = storage.join(str(out), PREDICTIONS_DIR)
    if not storage.is_dir(folder):
        return
    planned = {u.name for u in units}
    shards = {s.name for u in units for s in u.shards}
    for uri in storage.list_files(folder, ".parquet"):
        name = shard_name(uri)
        if name in planned:
            continue
        both = sorted(_covered_shards(uri) & shards)
        if both:
            raise TTTPipeError(
                f"the results folder already has predictions {name} for shard {both[0]}, which "
                f"this run would predict again in another unit (another --stream?); use a new "
                f"--out or delete {folder}")


def prepare_adapt(req: AdaptRequest) -> AdaptPlan:
    """Validate everything (no Ray): numbers, checkpoint, shards, the results folder."""
    started = time.perf_counter()
    _check_numbers(req)
    req = _absolute_paths(req)
    ckpt = load_checkpoint(req.checkpoint)
    # the method to run (default: the checkpoint's); a joint method needs its own checkpoint
    choice = resolve_method(ckpt, req.method, req.method_config)
    check_adaptable(ckpt, req.trust_model, method=choice.name)  # an untrusted import path: fail here
    check_method_engine(ckpt, choice, trusted_modules(req.trust_model))  # e.g. tent, no norm layer
    fisher = resolve_fisher(choice, ckpt, req.fisher_data, req.fisher_samples, req.data_dir)
    if req.save_adapted:
        req = dataclasses.replace(req, save_adapted=_absolute(req.save_adapted))
        if storage.exists(req.save_adapted) and not storage.is_dir(req.save_adapted):
            raise TTTPipeError(f"--save-adapted {req.save_adapted} is a file; pass a folder")
    try:
        settings = _settings(req, ckpt, choice, fisher)
    except (TypeError, ValueError) as exc:
        raise TTTPipeError(f"checkpoint {req.checkpoint} has an invalid method config ({exc}); retrain it") from None
    if settings.steps < 0 or settings.batch_size < 1 or not settings.lr > 0 or settings.mode not in MODES:
        raise TTTPipeError(f"invalid adaptation settings {settings}; pass --steps, --lr, --batch-size, --mode")
    settings, stream = _stream_settings(req, settings)
    if storage.exists(req.out) and not storage.is_dir(req.out):
        raise TTTPipeError(f"--out {req.out} is a file; pass a folder for the results")
    dataset = ckpt.dataset
    shape = checkpoint_image_shape(ckpt)
    infos: list[ShardInfo] = []
    seen: dict[str, str] = {}
    for uri in list_shards(req.shards):
        name = shard_name(uri)
        if name in seen:
            raise TTTPipeError(f"two shards named {name} ({seen[name]} and {uri}); "
                               "their predictions would collide; pass one of them")
        seen[name] = uri
        # Footer only (schema, rows, metadata, statistics): the driver never reads pixels;
        # the actor that reads the shard checks its content (NaN pixels, duplicate ids).
        shard = read_shard_footer(uri)
        if shard.dataset != dataset:
            raise TTTPipeError(f"shard '{uri}' holds {shard.dataset!r} images but the "
                               f"checkpoint was trained on {dataset!r}; use shards of the same dataset")
        if shard.image_shape != shape:
            raise TTTPipeError(f"shard '{uri}' holds images of shape {shard.image_shape} but the "
                               f"checkpoint expects {shape}; use shards made for that model's data")
        if shard.min_id is not None and shard.max_id - shard.min_id + 1 < shard.rows:
            raise TTTPipeError(f"shard '{uri}' repeats sample ids ({shard.rows} rows, ids "
                               f"{shard.min_id}..{shard.max_id}); {_SHARD_FIX}")
        infos.append(ShardInfo(uri=uri, name=name, corruption=shard.corruption,
                               severity=shard.severity, samples=shard.rows, done=False,
                               labelled=shard.labelled, suite=str(shard.metadata.get("suite", ""))))
    units, stream = _plan_units(req, stream, infos)
    _check_foreign_predictions(req.out, units)
    done_units = set()
    for unit in units:  # iid: one per shard, its file named after it (as before streams)
        pred = unit_uri(req.out, unit.name)
        if storage.exists(pred):
            _check_existing(pred, unit.name, settings, stream)
            if not req.save_adapted or storage.exists(storage.join(req.save_adapted, unit.name,
                                                                   MANIFEST_NAME)):
                done_units.add(unit.name)  # (redone when its adapted checkpoint is missing)
    done_shards = {s.name for u in units if u.name in done_units for s in u.shards}
    infos = [dataclasses.replace(s, done=s.name in done_shards) for s in infos]
    return AdaptPlan(request=req, checkpoint=ckpt, settings=settings, shards=infos,
                     validate_s=time.perf_counter() - started, units=units,
                     done_units=frozenset(done_units), stream=stream)


def _run_config(plan: AdaptPlan) -> dict:
    m = plan.checkpoint.manifest
    training = dict(m.get("training", {}))
    metrics = training.pop("metrics", None) or []
    return {
        "checkpoint": {"uri": plan.checkpoint.uri, "model": m.get("model"), "method": m.get("method"),
                       "dataset": m.get("dataset"), "weights_sha256": m.get("weights_sha256"),
                       "model_sha256": model_sha256(plan.checkpoint), "created": m.get("created"),
                       "training": {**training, "final": metrics[-1] if metrics else None}},
        "settings": dataclasses.asdict(plan.settings),
        "method": {"name": plan.settings.method,  # the config the actors resolve and run
                   "config": {**resolve_method(plan.checkpoint, plan.settings.method,
                                               json.loads(plan.settings.method_config)).config,
                              **plan.settings.flags()}},  # the flags win (as in the actors)
        "args": dataclasses.asdict(plan.request),
        "shards": [s.uri for s in plan.shards],
        "samples": {s.name: s.samples for s in plan.shards},
        "stream": dataclasses.asdict(plan.stream),
        **({"streams": {u.name: [s.name for s in u.shards] for u in plan.units}}
           if plan.stream.stream != "iid" else {}),
    }


def _remove_stale_temps(out: str) -> None:
    """Hidden temp files of writers that were killed (local folders only; object stores
    write in one PUT). One run per results folder at a time."""
    fs, root = storage.resolve(out)
    if not isinstance(fs, pafs.LocalFileSystem):
        return
    for folder in (root, os.path.join(root, PREDICTIONS_DIR)):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if name.startswith(".") and name.endswith(".tmp"):
                log.info("removing stale temp file %s", os.path.join(folder, name))
                try:
                    os.unlink(os.path.join(folder, name))
                except FileNotFoundError:
                    pass


def _start_results(plan: AdaptPlan) -> None:
    """The results folder, run.json (atomically); a stale accuracy.parquet goes until the end."""
    out = plan.request.out
    storage.makedirs(storage.join(out, PREDICTIONS_DIR))
    _remove_stale_temps(out)
    storage.atomic_write_bytes((json.dumps(_run_config(plan), indent=2) + "\n").encode(),
                               storage.join(out, RUN_FILE))
    if plan.pending:
        storage.remove(storage.join(out, ACCURACY_FILE))
        storage.remove(storage.join(out, COST_FILE))


_FOOTER_THREADS = 16  # footers are small reads: object stores answer them in parallel


def _footer(uri: str) -> tuple[int, dict]:
    """(row count, key-value metadata) of a Parquet file, from its footer alone."""
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        meta = pq.read_metadata(f)
    kv = meta.metadata or {}
    return meta.num_rows, {k.decode(): v.decode() for k, v in kv.items()}


def _checked_footer(uri: str, unit: str) -> tuple[int, dict]:
    """`_footer` of `unit`'s predictions (`shard NAME`, `stream NAME`); one-line error when the
    file is missing (rerun resumes) or unreadable (delete it)."""
    try:
        return _footer(uri)
    except FileNotFoundError:
        raise TTTPipeError(f"predictions for {unit} are missing ({uri}); rerun to resume") from None
    except (pa.ArrowException, OSError) as exc:
        raise TTTPipeError(f"cannot read predictions {uri} ({' '.join(str(exc).split())}); "
                           "delete it and rerun") from None


def _rows_per_step(summary: dict) -> dict[int, int]:
    """step -> rows, from a summary's groups (each group's key ends with its step)."""
    per_step: dict[int, int] = {}
    for *key, n, _labelled, _correct in summary.get("groups", []):
        per_step[key[-1]] = per_step.get(key[-1], 0) + n
    return per_step


def _shard_summary(s: ShardInfo, uri: str, settings: AdaptSettings,
                   stream: StreamSettings = StreamSettings()) -> dict:
    """The checked summary of one shard's predictions, from the file's footer only.

    Files of an older ttt-pipe have no summary in their footer: that one file is read (and
    dropped again) to compute it, so memory stays one shard's predictions at most.
    """
    steps = settings.steps + 1
    rows, meta = _checked_footer(uri, f"shard {s.name}")
    if _settings_diff(json.loads(meta.get(SETTINGS_KEY, "{}")), settings) or \
            StreamSettings.from_metadata(meta) != stream:
        raise TTTPipeError(f"predictions for shard {s.name} were made with other settings; "
                           f"delete {uri} and rerun")
    if SUMMARY_KEY in meta:
        summary = json.loads(meta[SUMMARY_KEY])
    else:
        fs, path = storage.resolve(uri)
        summary = summarize_predictions(pq.read_table(path, filesystem=fs), s.name, steps)
    per_step = _rows_per_step(summary)
    expected = s.samples * steps
    if not (rows == summary.get("rows") == expected and summary.get("samples") == s.samples
            and summary.get("shard") == s.name
            and per_step == {step: s.samples for step in range(steps)}):
        raise TTTPipeError(
            f"predictions for shard {s.name} have {rows} rows (summary: {summary.get('rows')} rows, "
            f"{summary.get('samples')} samples), expected {s.samples} samples x {steps} steps; "
            f"delete {uri} and rerun")
    return summary


def _stream_summary(unit: StreamUnit, uri: str, settings: AdaptSettings, stream: StreamSettings) -> dict:
    """`_shard_summary` of a stream file: per shard of the stream, its rows against its footer."""
    steps = settings.steps + 1
    rows, meta = _checked_footer(uri, f"stream {unit.name}")
    if _settings_diff(json.loads(meta.get(SETTINGS_KEY, "{}")), settings) or SUMMARY_KEY not in meta \
            or StreamSettings.from_metadata(meta) != stream:
        raise TTTPipeError(f"predictions for stream {unit.name} were made with other settings; "
                           f"delete {uri} and rerun")
    summary = json.loads(meta[SUMMARY_KEY])
    expected = {s.name: s.rows for s in unit.shards}
    per_step = _rows_per_step(summary)
    if not (rows == summary.get("rows") == unit.samples * steps and summary.get("shards") == expected
            and summary.get("stream") == unit.name
            and per_step == {step: unit.samples for step in range(steps)}):
        raise TTTPipeError(
            f"predictions for stream {unit.name} have {rows} rows (summary: {summary.get('rows')} rows, "
            f"shards {summary.get('shards')}), expected {expected} samples x {steps} steps; "
            f"delete {uri} and rerun")
    return summary


def finalize_results(plan: AdaptPlan) -> pa.Table:
    """Check exactly one prediction per (sample, step) in every shard; write accuracy.parquet.

    Reads the predictions files' footers only (row count, settings, the summary the actor
    wrote with the rows), never the predictions: the driver's memory does not grow with the
    data. Each actor checked its shard's (sample, step) pairs before writing; here every
    footer's row count must match its summary and the shard's sample count.
    """
    iid = plan.stream.stream == "iid"
    if iid:
        jobs = [(s, predictions_uri(plan.request.out, s.uri)) for s in plan.shards]
        check = _shard_summary
    else:
        jobs = [(u, unit_uri(plan.request.out, u.name)) for u in plan.units]
        check = _stream_summary
    with ThreadPoolExecutor(max_workers=_FOOTER_THREADS) as pool:
        summaries = list(pool.map(lambda job: check(*job, plan.settings, plan.stream), jobs))
    accuracy = accuracy_from_summaries(summaries)
    written = accuracy if iid else accuracy_from_summaries(summaries, by_stream=True)
    storage.atomic_write_table(written, storage.join(plan.request.out, ACCURACY_FILE),
                               metadata={SETTINGS_KEY: plan.settings.to_json(), **plan.stream.metadata()})
    # cost.parquet: the shards' cost sidecars in one table (shards of older versions have none)
    cost_file = storage.join(plan.request.out, COST_FILE)
    storage.remove(cost_file)  # so read_costs reads the sidecars, never a stale table
    costs = read_costs(plan.request.out, [uri for _, uri in jobs], threads=_FOOTER_THREADS)
    if costs.num_rows:
        storage.atomic_write_table(costs, cost_file)
    return accuracy


def run_adapt(req: AdaptRequest, *, plan: AdaptPlan | None = None,
              on_plan: Callable[[AdaptPlan], None] | None = None,
              on_shard_done: Callable[[dict], None] | None = None) -> AdaptOutcome:
    """Validate, adapt every pending shard on a Ray actor pool, write accuracy.parquet.

    The outcome's `timings` (seconds): validate_s, connect_s (Ray start/attach), pool_start_s
    (actors up, checkpoint loaded), dispatch_s (first shard sent to last one written),
    shutdown_s, finalize_s, wall_s; read_s/adapt_s/write_s are summed over shards.

    `on_plan(plan)` is called once validation passed, `on_shard_done(summary)` after each
    shard's predictions are written (the CLI drives its progress bars with them).
    """
    from jobs.cluster import connect, job_cluster_address  # imports ray

    wall = time.perf_counter()
    timings: dict = {}
    plan = plan or prepare_adapt(req)
    req = plan.request  # paths made absolute
    timings["validate_s"] = plan.validate_s
    if on_plan is not None:
        on_plan(plan)
    pending = plan.pending_units
    pool_plan, summaries = None, []
    if not pending:
        log.info("all %d shard(s) already have predictions in %s", len(plan.shards), req.out)
        _start_results(plan)
    else:
        if plan.stream.stream == "iid":  # a shard is a stream of one: its uri is the unit
            tasks = [(u.shards[0].uri, unit_uri(req.out, u.name)) for u in pending]
        else:
            tasks = [(u, unit_uri(req.out, u.name)) for u in pending]
        started = time.perf_counter()
        with connect(req.address) as resources:  # an unreachable address fails here, before any write
            timings["connect_s"] = time.perf_counter() - started
            local = req.address is None and job_cluster_address() is None
            if local and req.gpus_per_actor > 0 and resources["gpus"] <= 0:
                raise TTTPipeError(f"--gpus-per-actor {req.gpus_per_actor:g} but this machine has no "
                                   "GPU; pass --gpus-per-actor 0 (CPU) or the --address of a cluster")
            pool_plan = plan_pool(resources, len(tasks), req.actors, req.cpus_per_actor,
                                  req.gpus_per_actor, autoscale=not local)
            log.info("adapting %d %s on %s", len(tasks),
                     "shard(s)" if plan.stream.stream == "iid" else f"{plan.stream.stream} stream(s)",
                     pool_plan)
            _start_results(plan)
            try:
                pool = run_pool(plan.checkpoint, plan.settings, pool_plan, tasks,
                                on_done=on_shard_done, kill_marker=os.environ.get(KILL_ENV),
                                trusted=trusted_modules(req.trust_model),
                                save_adapted=req.save_adapted, stream=plan.stream)
            finally:
                _remove_stale_temps(req.out)
            summaries = pool["shards"]
            timings.update(pool_start_s=pool["start_s"], dispatch_s=pool["dispatch_s"],
                           actor_init_s=pool["init_s"], actors_ready=pool["actors"],
                           retried=pool["retried"])
            stopping = time.perf_counter()
        timings["shutdown_s"] = time.perf_counter() - stopping
    started = time.perf_counter()
    accuracy = finalize_results(plan)
    timings["finalize_s"] = time.perf_counter() - started
    for key in ("read_s", "adapt_s", "write_s"):  # actor-seconds, summed over shards
        timings[key] = sum(s[key] for s in summaries)
    timings["wall_s"] = time.perf_counter() - wall
    return AdaptOutcome(plan=plan, accuracy=accuracy, timings=timings, pool=pool_plan,
                        shard_summaries=summaries)
