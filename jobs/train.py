"""Joint training on Ray: one trainer actor trains the model and its method's auxiliary part.

The driver (`train`) resolves and checks the settings (`resolve_spec`), connects to Ray
(`jobs.cluster.connect`), starts one `Trainer` actor and drives it in chunks of batches so the
CLI can show progress; the actor loads the train split itself (from a path its node can
read), trains, and writes the checkpoint itself (`pipeline.checkpoint.save_checkpoint`, atomic;
a local path or `s3://...` that every node can read). No checkpoint is written unless training
finishes, so a failed or interrupted run leaves no checkpoint behind (only its resume state).

Deterministic given `seed` on CPU: the model's initial weights (global torch seed), the
auxiliary part (`config.seed`) and the shuffling (a seeded `torch.Generator`) all follow it,
and the actor's thread count is fixed by the plan. On GPU, cuDNN kernels may differ slightly.

The loop itself (recipe, augmentation, batches, validation, resumable state) is
`pipeline.training`; the actor writes the state after every epoch to `<out>.train-state/` and a
rerun of the same command continues from the last finished epoch with bit-identical weights
(same thread count); the folder is removed once the checkpoint is written.

`--init CKPT` starts from an existing checkpoint's model (pipeline/training/init.py): with
`--train aux` the model is frozen and only the method's auxiliary part trains (the model part
of the written checkpoint is bit-identical to the init's), with `--train all` both fine-tune.
Test hook: `TTT_PIPE_TRAIN_TEST_KILL_ONCE=<marker path>` makes the trainer that creates the
marker `os._exit(1)` right after writing its first epoch's state.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
import torch

from jobs.cluster import actor_device, connect
from jobs.pool import actor_env
from pipeline import storage
from pipeline.errors import TTTPipeError

__all__ = ["DEFAULT_MODELS", "KILL_ENV", "TrainSpec", "TrainPlan", "Trainer", "resolve_spec", "plan_trainer", "progress_chunk", "train"]

log = logging.getLogger(__name__)

# the seed tutorials' networks; source (plain supervised training, adapted later by norm, tent,
# ...) the seed CNN with BatchNorm, so the norm-based methods have layers to adapt
DEFAULT_MODELS = {"ttt": "seed_cnn", "it3": "seed_rescnn", "source": "seed_cnn_bn"}
KILL_ENV = "TTT_PIPE_TRAIN_TEST_KILL_ONCE"
_CHUNKS_PER_EPOCH = 20  # progress updates per epoch (one actor call each)


def progress_chunk(batches_per_epoch: int) -> int:
    """Batches per progress report: 1/_CHUNKS_PER_EPOCH of an epoch, at least one."""
    return max(1, batches_per_epoch // _CHUNKS_PER_EPOCH)


@dataclass(frozen=True)
class TrainSpec:
    """Everything a training run needs, resolved (no None but `data_dir` and `limit`)."""

    method: str
    dataset: str
    out: str
    model: str
    epochs: int
    batch_size: int
    lr: float
    config: dict  # the method's config (`<Method>Config.to_dict()`), training fields included
    seed: int = 0
    limit: int | None = None
    data_dir: str | None = None
    gpus: float | None = None  # None: one GPU if the cluster has any, else CPU
    cpus: float = 1.0          # CPUs the trainer reserves on CPU; torch runs floor(cpus) threads
    model_kwargs: dict = field(default_factory=dict)  # --model-kwargs (pipeline/model_spec.py)
    normalize: str | None = None  # --normalize; None: the model's default
    trusted: tuple[str, ...] = ()  # modules the trainer may import (--trust-model + --model's own)
    recipe: dict = field(default_factory=dict)  # pipeline.training.TrainRecipe.to_dict(); {}: the seeds'
    image_size: int | None = None  # --image-size (imagenet, folder:PATH); None: the dataset's
    init: dict | None = None  # --init: InitSource.manifest_entry() + its `model` entry
    train_scope: str = "all"  # --train: all (model + auxiliary part) or aux (model frozen)
    workers: int = 1  # --workers: data-parallel Ray Train workers (jobs/train_parallel.py); 1: one actor


@dataclass(frozen=True)
class TrainPlan:
    """What the trainer actor asks Ray for and how many torch threads it runs."""

    num_cpus: float
    num_gpus: float
    threads: int


def _engine_cls(method: str):
    import engines

    try:
        return engines.get_engine(method)
    except (KeyError, ValueError) as exc:
        raise TTTPipeError(exc.args[0] if exc.args else str(exc)) from None


def _config_cls(method: str):
    return _engine_cls(method).config_cls


def _base_config(method: str, preset: str | None):
    """The method's default config, or its named preset (one-line error naming the valid ones)."""
    config_cls = _config_cls(method)
    if preset is None:
        return config_cls()
    try:
        return config_cls.preset(preset)
    except ValueError as exc:
        raise TTTPipeError(f"--preset: {exc}") from None


def _local_abspath(uri: str | None) -> str | None:
    # Actors may run in another working directory: pin local paths before they travel.
    if uri is None or storage.is_uri(uri):
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def resolve_spec(method: str, dataset: str | None, out: str, *, model: str | None = None,
                 epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
                 aux_weight: float | None = None, layer: str | None = None, limit: int | None = None,
                 seed: int = 0, data_dir: str | None = None, gpus: float | None = None,
                 cpus: float = 1.0, model_kwargs: str | dict | None = None, normalize: str | None = None,
                 trust_model: str | None = None, optimizer: str | None = None,
                 weight_decay: float | None = None, momentum: float | None = None,
                 schedule: str | None = None, augment: str | None = None,
                 precision: str | None = None, val_fraction: float | None = None,
                 image_size: int | None = None, init: str | None = None,
                 train: str | None = None, preset: str | None = None, workers: int = 1) -> TrainSpec:
    """Fill in the method's defaults (its config class, or its named `preset`, e.g. "seeds")
    and check every value. The config, test-time fields included, goes into the checkpoint, so
    `adapt` on it runs the preset's settings unless told otherwise.

    With `init` the model, dataset and image size come from that checkpoint
    (pipeline.training.resolve_init; `model`, `model_kwargs`, `normalize`, `image_size` and
    `dataset` must then be None, bar `dataset="folder:PATH"` for a folder checkpoint)."""
    import engines
    from pipeline.datasets import get_dataset
    from pipeline.model_spec import (ModelSpec, check_model_name, is_import_path, layer_check_model,
                                     layer_for, parse_import_path, parse_model_kwargs, parse_trusted,
                                     resolve_model_spec)
    from pipeline.training import check_scope, resolve_init

    scope = check_scope(train, init)
    _check_trainable(method, aux_weight, layer)
    if scope == "aux" and method == "source":
        raise TTTPipeError("--train aux trains a method's auxiliary part, and source has none; "
                           "use --train all to fine-tune the model, or --method ttt|it3")
    source = None
    if init is not None and out is not None and str(out).strip() and \
            _local_abspath(str(out)).rstrip("/") == _local_abspath(str(init)).rstrip("/"):
        raise TTTPipeError(f"--out {out} is the --init checkpoint itself; training would overwrite "
                           "the weights it starts from: pass another --out")
    if init is not None:
        source = resolve_init(_local_abspath(str(init)), dataset=dataset, model=model,
                              model_kwargs=model_kwargs, normalize=normalize,
                              image_size=image_size, trust_model=trust_model)
        dataset, image_size, model = source.dataset, source.image_size, source.model["name"]
    elif dataset is None:
        raise TTTPipeError("--dataset is missing; name the dataset to train on (or pass --init "
                           "CKPT to train from a checkpoint's model and dataset)")
    ds = get_dataset(dataset, image_size)  # unknown name -> TTTPipeError listing the valid ones
    if source is not None:
        trusted = source.trusted
        model_spec = ModelSpec.from_manifest(source.model)
    else:
        model = model or DEFAULT_MODELS.get(method, "")
        check_model_name(model)
        trusted = parse_trusted(trust_model)
        if is_import_path(model):  # naming it on the command line trusts it for this run
            trusted = tuple(dict.fromkeys(trusted + (parse_import_path(model)[0],)))
        model_spec = resolve_model_spec(model, ds, normalize=normalize, model_kwargs=model_kwargs)
    checks = [(workers, "--workers", 1), (epochs, "--epochs", 1), (batch_size, "--batch-size", 1), (limit, "--limit", 1)]
    for value, flag, low in checks:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise TTTPipeError(f"{flag} must be an integer >= {low}, got {value!r}")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise TTTPipeError(f"--lr must be a positive number, got {lr!r}")
    from pipeline.training import resolve_recipe

    base = _base_config(method, preset)
    recipe = resolve_recipe(ds.name, method_lr=base.train_lr if lr is None else lr,
                            optimizer=optimizer, lr=lr, weight_decay=weight_decay, momentum=momentum,
                            schedule=schedule, augment=augment, precision=precision,
                            val_fraction=val_fraction, image_shape=ds.image_shape)
    if recipe.precision == "fp16" and gpus is not None and gpus == 0:
        raise TTTPipeError("--precision fp16 needs a CUDA GPU (its GradScaler); "
                           "use --precision bf16 on the CPU")
    if aux_weight is not None and not (math.isfinite(aux_weight) and aux_weight >= 0):
        raise TTTPipeError(f"--aux-weight must be a number >= 0, got {aux_weight!r}")
    if gpus is not None and not (math.isfinite(gpus) and gpus >= 0):
        raise TTTPipeError(f"--gpus must be a number >= 0, got {gpus!r}")
    low = 1 if workers == 1 else 0.1  # Ray Train workers may share a CPU (--workers N > 1)
    if not (math.isfinite(cpus) and cpus >= low):
        raise TTTPipeError(f"--cpus must be a number >= {low:g}, got {cpus!r}")
    if not str(out).strip():
        raise TTTPipeError("--out is empty; name the checkpoint directory, e.g. runs/ttt-ckpt")
    check_model = layer_check_model(model_spec, trusted)  # zoo: on the meta device
    config_cls = _config_cls(method)
    layer = (layer_for(model, method, layer or (base.layer if preset else None), check_model)
             if config_cls.requires_layer else None)
    changes = {"seed": int(seed)}
    for key, value in (("train_epochs", epochs), ("train_batch_size", batch_size), ("train_lr", recipe.lr),
                       ("aux_weight", aux_weight), ("layer", layer)):
        if value is not None:
            changes[key] = value
    try:
        config = base.replace(**changes)
        if config.layer:
            engines.find_module(check_model, config.layer)  # a bad --layer fails before Ray
    except (TypeError, ValueError) as exc:
        raise TTTPipeError(str(exc).splitlines()[0]) from None
    return TrainSpec(method=method, dataset=dataset, out=_local_abspath(str(out)), model=model,
                     epochs=config.train_epochs, batch_size=config.train_batch_size,
                     lr=config.train_lr, config=config.to_dict(), seed=int(seed), limit=limit,
                     data_dir=_local_abspath(data_dir), gpus=gpus, cpus=float(cpus),
                     model_kwargs={} if source else parse_model_kwargs(model_kwargs),
                     normalize=None if source else normalize, trusted=trusted,
                     recipe=recipe.to_dict(), image_size=image_size, train_scope=scope, workers=workers,
                     init=None if source is None else {**source.manifest_entry(), "model": source.model})


def _check_trainable(method: str, aux_weight: float | None, layer: str | None) -> None:
    """`source` trains the model alone; the other methods without joint training have nothing
    to train (they adapt a source checkpoint)."""
    from pipeline.training.supervised import trains_model_alone

    if trains_model_alone(method):
        if aux_weight is not None or layer:
            raise TTTPipeError("--aux-weight and --layer belong to a method's auxiliary part; "
                               "source trains the model alone: drop them")
        return
    if not _engine_cls(method).needs_joint_training:
        raise TTTPipeError(f"{method} has no part to train; train the model with ttt-pipe train "
                           f"--method source, then adapt it with ttt-pipe adapt --method {method}")


def plan_trainer(gpus: float | None, cluster_gpus: float, max_node_cpus: float, local: bool,
                 cpus: float = 1.0) -> TrainPlan:
    """Resources for the one trainer actor.

    GPU (asked for, or by default when the cluster has GPUs): 1 CPU + the GPUs, 1 thread (the
    data lives on the GPU). A remote cluster may have no GPU node *yet* (autoscaling from 0):
    an explicit `--gpus` is then requested anyway; a local machine without GPUs falls back to
    the CPU. CPU: the actor reserves `cpus` CPUs (default 1) and runs floor(cpus) torch
    threads — never more threads than it reserved: on a busy node, extra OpenMP threads wait on
    each other (seed nets on this 2-core VM with one core busy: 2 threads 8-10x slower than 1).
    """
    want = (1.0 if cluster_gpus >= 1 else 0.0) if gpus is None else float(gpus)
    if want > 0 and cluster_gpus <= 0 and local:
        log.warning("asked for %g GPU(s) but this machine has none; training on the CPU", want)
        want = 0.0
    if want > 0:
        return TrainPlan(num_cpus=1.0, num_gpus=want, threads=1)
    if local and cpus > max_node_cpus:
        raise TTTPipeError(f"--cpus {cpus:g} exceeds this machine's {max_node_cpus:g} CPUs; "
                           f"pass --cpus {max(1, int(max_node_cpus))} or less")
    return TrainPlan(num_cpus=float(cpus), num_gpus=0.0, threads=max(1, math.floor(cpus)))


class Trainer:
    """The trainer actor: `setup()` once, `run(max_batches)` until done, then `save()`.

    `__init__` only stores the spec, so a failure (missing data, bad layer) surfaces as an
    ordinary exception of `setup()` rather than a dead actor.
    """

    def __init__(self, spec: TrainSpec, threads: int, kill_marker: str | None = None,
                 parallel: dict | None = None):
        self.spec, self.threads, self.kill_marker = spec, threads, kill_marker
        # jobs/train_parallel.py: {"rank", "world_size", "device", "wrap", "all_reduce"}
        self.parallel = parallel or {}

    def setup(self) -> dict:
        from pipeline.checkpoint import dataset_entry
        from pipeline.datasets import load_split
        from pipeline.model_spec import ModelSpec, build_model_from_spec, resolve_model_spec
        from pipeline.training import (Batches, EpochLoop, TrainRecipe, load_init_model, load_state,
                                       split_train_val)
        from pipeline.training.data import to_pixels
        from pipeline.training.supervised import trainable_engine

        spec = self.spec
        torch.set_num_threads(self.threads)
        par = self.parallel
        self.device = par.get("device") or actor_device()
        split = load_split(spec.dataset, "train", data_dir=spec.data_dir, image_size=spec.image_size)
        n = len(split.labels) if spec.limit is None else min(spec.limit, len(split.labels))
        if n == 0:
            raise TTTPipeError(f"the {spec.dataset} train split is empty; pass the full files with --data-dir")
        ds = split.spec
        recipe = TrainRecipe(**spec.recipe) if spec.recipe else TrainRecipe(lr=spec.lr)
        images = torch.from_numpy(split.images[:n])  # uint8 (N, C, H, W), converted per batch
        labels = torch.from_numpy(split.labels[:n])  # (N,) int64
        train_rows, val_rows = split_train_val(n, recipe.val_fraction, spec.seed)
        if len(val_rows):
            train_set = Batches(images[train_rows], labels[train_rows], self.device)
            val_set = Batches(images[val_rows], labels[val_rows], self.device)
        else:
            train_set, val_set = Batches(images, labels, self.device), None
        self.dataset_info = dataset_entry(ds)
        self.samples, self.val_samples, self.recipe = n, len(val_rows), recipe
        torch.manual_seed(spec.seed)  # the model's initial weights (or, with --init, the RNG's start)
        if spec.init is not None:
            self.model_spec = ModelSpec.from_manifest(spec.init["model"])
            model, _ = load_init_model(spec.init["uri"], spec.init["weights_sha256"], spec.trusted)
        else:
            self.model_spec = resolve_model_spec(spec.model, ds, normalize=spec.normalize,
                                                 model_kwargs=spec.model_kwargs)
            model = build_model_from_spec(self.model_spec, spec.trusted)
        config = _config_cls(spec.method).from_dict(spec.config)
        self.engine = trainable_engine(spec.method, model, to_pixels(images[:1]), config,
                                       spec.model).to(self.device)
        frozen = ()
        if spec.train_scope == "aux":  # only the auxiliary part trains; BN statistics kept
            self.engine.model.requires_grad_(False)
            frozen = (self.engine.model,)
        self.engine.train()
        forward = None
        if par.get("wrap") is not None:  # one module (model + aux part) for DDP: all its parameters
            from pipeline.training.parallel import JointLoss

            forward = par["wrap"](JointLoss(self.engine))
        self.loop = EpochLoop(self.engine, recipe, train_set, val_set, epochs=spec.epochs,
                              batch_size=spec.batch_size, seed=spec.seed, frozen=frozen,
                              rank=par.get("rank", 0), world_size=par.get("world_size", 1),
                              forward=forward, all_reduce=par.get("all_reduce"))
        self.resumed_from = 0
        state = load_state(spec.out)
        if state is not None:
            if state.get("fingerprint") != _fingerprint(spec):
                raise TTTPipeError(f"{spec.out}.train-state holds an interrupted run with other settings; "
                                   "rerun it with the same ones or delete that folder to start over")
            self.loop.load_state_dict(state)
            self.resumed_from = self.loop.epoch
            log.info("resuming %s after epoch %d/%d", spec.out, self.loop.epoch, spec.epochs)
        return {"samples": n, "train_samples": len(train_set), "val_samples": len(val_rows),
                "batches_per_epoch": self.loop.batches_per_epoch, "epochs": spec.epochs,
                "resumed_from_epoch": self.resumed_from, "device": str(self.device),
                "threads": self.threads, "source": split.source, "recipe": recipe.to_dict()}

    def run(self, max_batches: int) -> dict:
        """Train up to `max_batches` batches, stopping at the end of an epoch; report progress.

        After an epoch that is not the last, its state is written (atomically) for a resume.
        """
        from pipeline.training import save_state

        report = self.loop.run(max_batches)
        m = report["epoch_metrics"]
        if m:
            log.info("epoch %d/%d: loss %.4f, accuracy %.4f, aux loss %.4f%s, %.0f images/s",
                     m["epoch"], self.spec.epochs, m["loss"], m["accuracy"], m["aux_loss"],
                     f", val accuracy {m['val_accuracy']:.4f}" if "val_accuracy" in m else "",
                     m["images_per_s"] or 0.0)
            if not report["finished"] and self.parallel.get("rank", 0) == 0:
                save_state(self.spec.out, {**self.loop.state_dict(), "fingerprint": _fingerprint(self.spec)})
                self._maybe_die()
        return report

    def _maybe_die(self) -> None:
        if not self.kill_marker:
            return
        try:
            fd = os.open(self.kill_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        os._exit(1)

    def save(self) -> dict:
        """Write the checkpoint to `spec.out` (atomically), drop the training state; return the manifest."""
        from pipeline.checkpoint import save_checkpoint
        from pipeline.training import remove_state
        from pipeline.training.supervised import checkpoint_weights

        spec, recipe = self.spec, self.recipe
        manifest = {
            "model": self.model_spec.to_manifest(),
            "method": {"name": spec.method, "config": spec.config},
            "dataset": self.dataset_info,
            "training": {"epochs": spec.epochs, "batch_size": spec.batch_size, "lr": recipe.lr,
                         "optimizer": recipe.optimizer, "weight_decay": recipe.weight_decay,
                         "momentum": recipe.momentum, "schedule": recipe.schedule,
                         "augment": recipe.augment, "precision": recipe.precision,
                         "val_fraction": recipe.val_fraction, "val_samples": self.val_samples,
                         "seed": spec.seed, "limit": spec.limit, "samples": self.samples,
                         "train_samples": self.samples - self.val_samples,
                         "metrics": self.loop.metrics, "resumed_from_epoch": self.resumed_from,
                         "seconds": round(self.loop.seconds, 3),
                         "device": str(self.device), "torch": torch.__version__,
                         "train": spec.train_scope,
                         "init": None if spec.init is None else
                         {k: v for k, v in spec.init.items() if k != "model"}},
        }
        if spec.workers > 1:  # the single-worker manifest stays as it was
            manifest["training"].update(workers=spec.workers,
                                        global_batch_size=spec.batch_size * spec.workers)
        written = save_checkpoint(spec.out, checkpoint_weights(spec.method, self.engine), manifest)
        remove_state(spec.out)
        return written


def _fingerprint(spec: TrainSpec) -> str:
    """What a resumed run must share with the interrupted one (not where it runs or reads from)."""
    import json

    fields = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("gpus", "cpus", "data_dir")}
    if fields["workers"] == 1:  # a single-worker state keeps its fingerprint from before --workers
        del fields["workers"]
    return json.dumps(fields, sort_keys=True, default=str)


def _unwrap(exc: ray.exceptions.RayTaskError) -> BaseException:
    """The actor's own exception (one line) instead of Ray's wrapper with a remote traceback."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, (TTTPipeError, ValueError, KeyError, FileNotFoundError)) else exc


def alive_nodes() -> tuple[list[dict], float]:
    """The connected cluster's alive nodes (`ray.nodes()` entries) and the most CPUs one has."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    return alive, max((n["Resources"].get("CPU", 0.0) for n in alive), default=1.0)


def train(spec: TrainSpec, address: str | None = None, on_event: Callable[[str, dict], None] | None = None) -> dict:
    """Train on Ray as `spec` says; return the written checkpoint's manifest.

    `spec.workers > 1` trains data-parallel through Ray Train (jobs/train_parallel.py).

    `on_event(kind, info)` is called with ("setup", plan info), ("progress", run report) and
    ("saved", manifest), so a CLI can draw progress without this module printing anything.
    """
    emit = on_event or (lambda kind, info: None)
    if spec.workers > 1:
        from jobs.train_parallel import train_parallel

        return train_parallel(spec, address=address, on_event=emit)
    with connect(address) as resources:
        _, max_node_cpus = alive_nodes()
        plan = plan_trainer(spec.gpus, resources["gpus"], max_node_cpus, local=address is None,
                            cpus=spec.cpus)
        if address is not None and not storage.is_uri(spec.out) and resources["nodes"] > 1:
            log.warning("--out %s is a local path: it is written on the trainer's node; use "
                        "storage every node can read (s3://...)", spec.out)
        if plan.num_gpus > resources["gpus"]:
            log.warning("waiting for a node with %g GPU(s); the autoscaler may need minutes "
                        "(Ctrl-C stops)", plan.num_gpus)
        actor = ray.remote(Trainer).options(
            num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, max_restarts=0,
            runtime_env={"env_vars": actor_env()},  # MKL_CBWR: same kernels in every process
        ).remote(spec, plan.threads, os.environ.get(KILL_ENV))
        try:
            info = ray.get(actor.setup.remote())
            emit("setup", {**info, **dataclasses.asdict(plan)})
            chunk = progress_chunk(info["batches_per_epoch"])
            while True:
                report = ray.get(actor.run.remote(chunk))
                emit("progress", report)
                if report["finished"]:
                    break
            manifest = ray.get(actor.save.remote())
        except ray.exceptions.RayTaskError as exc:
            raise _unwrap(exc) from None
        except ray.exceptions.RayActorError as exc:  # killed: out of memory, node lost, ...
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise TTTPipeError(f"the trainer actor died ({first}); check memory and `ray status`, "
                               "then rerun") from None
        finally:
            ray.kill(actor)
    emit("saved", manifest)
    return manifest
