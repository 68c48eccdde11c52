"""Joint training on Ray: one trainer actor trains the model and its method's auxiliary part.

The driver (`train`) resolves and checks the settings (`resolve_spec`), connects to Ray
(`jobs.cluster.connect`), starts one `Trainer` actor and drives it in chunks of batches so the
CLI can show progress; the actor loads the train split itself (from a path its node can
read), trains, and writes the checkpoint itself (`pipeline.checkpoint.save_checkpoint`, atomic;
a local path or `s3://...` that every node can read). Nothing is written unless training
finishes, so a failed or interrupted run leaves no checkpoint behind.

Deterministic given `seed` on CPU: the model's initial weights (global torch seed), the
auxiliary part (`config.seed`) and the shuffling (a seeded `torch.Generator`) all follow it,
and the actor's thread count is fixed by the plan. On GPU, cuDNN kernels may differ slightly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
import torch

from jobs.cluster import actor_device, connect
from jobs.pool import actor_env
from pipeline import storage
from pipeline.errors import TTTPipeError

__all__ = ["DEFAULT_MODELS", "TrainSpec", "TrainPlan", "Trainer", "resolve_spec", "plan_trainer", "train"]

log = logging.getLogger(__name__)

DEFAULT_MODELS = {"ttt": "seed_cnn", "it3": "seed_rescnn"}  # the seed tutorials' networks
_CHUNKS_PER_EPOCH = 20  # progress updates per epoch (one actor call each)


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


@dataclass(frozen=True)
class TrainPlan:
    """What the trainer actor asks Ray for and how many torch threads it runs."""

    num_cpus: float
    num_gpus: float
    threads: int


def _config_cls(method: str):
    import engines

    try:
        engine_cls = engines.get_engine(method)
    except (KeyError, ValueError) as exc:
        raise TTTPipeError(exc.args[0] if exc.args else str(exc)) from None
    return engine_cls.config_cls


def _local_abspath(uri: str | None) -> str | None:
    # Actors may run in another working directory: pin local paths before they travel.
    if uri is None or storage.is_uri(uri):
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def resolve_spec(method: str, dataset: str, out: str, *, model: str | None = None,
                 epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
                 aux_weight: float | None = None, layer: str | None = None, limit: int | None = None,
                 seed: int = 0, data_dir: str | None = None, gpus: float | None = None,
                 cpus: float = 1.0, model_kwargs: str | dict | None = None, normalize: str | None = None,
                 trust_model: str | None = None) -> TrainSpec:
    """Fill in the method's defaults (its config class, the seed tutorials) and check every value."""
    import engines
    from pipeline.datasets import get_dataset
    from pipeline.model_spec import (check_model_name, is_import_path, layer_check_model, layer_for,
                                     parse_import_path, parse_model_kwargs, parse_trusted,
                                     resolve_model_spec)

    ds = get_dataset(dataset)  # unknown name -> TTTPipeError listing the valid ones
    model = model or DEFAULT_MODELS.get(method, "")
    check_model_name(model)
    trusted = parse_trusted(trust_model)
    if is_import_path(model):  # naming it on the command line trusts it for this run
        trusted = tuple(dict.fromkeys(trusted + (parse_import_path(model)[0],)))
    model_spec = resolve_model_spec(model, ds, normalize=normalize, model_kwargs=model_kwargs)
    checks = [(epochs, "--epochs", 1), (batch_size, "--batch-size", 1), (limit, "--limit", 1)]
    for value, flag, low in checks:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise TTTPipeError(f"{flag} must be an integer >= {low}, got {value!r}")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise TTTPipeError(f"--lr must be a positive number, got {lr!r}")
    if aux_weight is not None and not (math.isfinite(aux_weight) and aux_weight >= 0):
        raise TTTPipeError(f"--aux-weight must be a number >= 0, got {aux_weight!r}")
    if gpus is not None and not (math.isfinite(gpus) and gpus >= 0):
        raise TTTPipeError(f"--gpus must be a number >= 0, got {gpus!r}")
    if not (math.isfinite(cpus) and cpus >= 1):
        raise TTTPipeError(f"--cpus must be a number >= 1, got {cpus!r}")
    if not str(out).strip():
        raise TTTPipeError("--out is empty; name the checkpoint directory, e.g. runs/ttt-ckpt")
    config_cls = _config_cls(method)
    check_model = layer_check_model(model_spec, trusted)  # zoo: on the meta device
    layer = layer_for(model, method, layer, check_model)
    changes = {"seed": int(seed)}
    for key, value in (("train_epochs", epochs), ("train_batch_size", batch_size), ("train_lr", lr),
                       ("aux_weight", aux_weight), ("layer", layer)):
        if value is not None:
            changes[key] = value
    try:
        config = config_cls(**changes)
        engines.find_module(check_model, config.layer)  # a bad --layer fails before Ray
    except (TypeError, ValueError) as exc:
        raise TTTPipeError(str(exc).splitlines()[0]) from None
    return TrainSpec(method=method, dataset=dataset, out=_local_abspath(str(out)), model=model,
                     epochs=config.train_epochs, batch_size=config.train_batch_size,
                     lr=config.train_lr, config=config.to_dict(), seed=int(seed), limit=limit,
                     data_dir=_local_abspath(data_dir), gpus=gpus, cpus=float(cpus),
                     model_kwargs=parse_model_kwargs(model_kwargs), normalize=normalize,
                     trusted=trusted)


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

    def __init__(self, spec: TrainSpec, threads: int):
        self.spec, self.threads = spec, threads

    def setup(self) -> dict:
        from pipeline.checkpoint import dataset_entry
        from pipeline.datasets import load_split, to_float
        from pipeline.model_spec import build_model_from_spec, make_engine, resolve_model_spec

        spec = self.spec
        torch.set_num_threads(self.threads)
        self.device = actor_device()
        split = load_split(spec.dataset, "train", data_dir=spec.data_dir)
        n = len(split.labels) if spec.limit is None else min(spec.limit, len(split.labels))
        if n == 0:
            raise TTTPipeError(f"the {spec.dataset} train split is empty; pass the full files with --data-dir")
        ds = split.spec
        self.x = torch.from_numpy(to_float(split.images[:n])).to(self.device)  # (N, C, H, W) pixel units
        self.y = torch.from_numpy(split.labels[:n]).to(self.device)            # (N,) int64
        self.model_spec = resolve_model_spec(spec.model, ds, normalize=spec.normalize,
                                             model_kwargs=spec.model_kwargs)
        self.dataset_info = dataset_entry(ds)
        torch.manual_seed(spec.seed)  # the model's initial weights
        model = build_model_from_spec(self.model_spec, spec.trusted)
        config = _config_cls(spec.method).from_dict(spec.config)
        self.engine = make_engine(spec.method, model, self.x[:1].cpu(), config, spec.model).to(self.device)
        self.engine.train()
        self.optimizer = torch.optim.Adam(self.engine.parameters(), lr=spec.lr)
        self.shuffle = torch.Generator().manual_seed(spec.seed)
        self.batches_per_epoch = math.ceil(n / spec.batch_size)
        self.epoch, self.batch, self.metrics = 0, 0, []
        self._sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, aux, correct
        self.started = time.perf_counter()
        return {"samples": n, "batches_per_epoch": self.batches_per_epoch, "epochs": spec.epochs,
                "device": str(self.device), "threads": self.threads, "source": split.source}

    def run(self, max_batches: int) -> dict:
        """Train up to `max_batches` batches, stopping at the end of an epoch; report progress."""
        spec, n = self.spec, len(self.y)
        if self.batch == 0:
            self.order = torch.randperm(n, generator=self.shuffle).to(self.device)
            self._sums.zero_()
        stop = min(self.batch + max_batches, self.batches_per_epoch)
        for b in range(self.batch, stop):
            idx = self.order[b * spec.batch_size:(b + 1) * spec.batch_size]
            x, y = self.x[idx], self.y[idx]
            loss, logits, aux_loss = self.engine.joint_loss(x, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            with torch.no_grad():  # sums stay on the device: no CPU-GPU sync per batch
                self._sums += torch.stack([loss.detach() * len(y), aux_loss.detach() * len(y),
                                           (logits.argmax(1) == y).sum()]).double()
        self.batch = stop
        loss_sum = float(self._sums[0])  # one sync per chunk
        if not math.isfinite(loss_sum):
            raise TTTPipeError(f"training diverged (loss is {loss_sum}) in epoch {self.epoch + 1}; "
                               "lower --lr or --aux-weight")
        report = {"epoch": self.epoch + 1, "batches_done": self.batch,
                  "batches_per_epoch": self.batches_per_epoch, "epoch_metrics": None,
                  "finished": False}
        if self.batch == self.batches_per_epoch:
            loss, aux, correct = (float(v) / n for v in self._sums)
            self.epoch, self.batch = self.epoch + 1, 0
            metrics = {"epoch": self.epoch, "loss": loss, "accuracy": correct, "aux_loss": aux}
            self.metrics.append(metrics)
            report.update(epoch_metrics=metrics, finished=self.epoch == spec.epochs)
        return report

    def save(self) -> dict:
        """Write the checkpoint to `spec.out` (atomically); return its manifest."""
        from pipeline.checkpoint import save_checkpoint

        spec = self.spec
        manifest = {
            "model": self.model_spec.to_manifest(),
            "method": {"name": spec.method, "config": spec.config},
            "dataset": self.dataset_info,
            "training": {"epochs": spec.epochs, "batch_size": spec.batch_size, "lr": spec.lr,
                         "optimizer": "adam", "seed": spec.seed, "limit": spec.limit,
                         "samples": len(self.y), "metrics": self.metrics,
                         "seconds": round(time.perf_counter() - self.started, 3),
                         "device": str(self.device), "torch": torch.__version__},
        }
        return save_checkpoint(spec.out, self.engine.state_dict(), manifest)


def _unwrap(exc: ray.exceptions.RayTaskError) -> BaseException:
    """The actor's own exception (one line) instead of Ray's wrapper with a remote traceback."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, (TTTPipeError, ValueError, KeyError, FileNotFoundError)) else exc


def train(spec: TrainSpec, address: str | None = None, on_event: Callable[[str, dict], None] | None = None) -> dict:
    """Train on Ray as `spec` says; return the written checkpoint's manifest.

    `on_event(kind, info)` is called with ("setup", plan info), ("progress", run report) and
    ("saved", manifest), so a CLI can draw progress without this module printing anything.
    """
    emit = on_event or (lambda kind, info: None)
    with connect(address) as resources:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        max_node_cpus = max((n["Resources"].get("CPU", 0.0) for n in alive), default=1.0)
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
        ).remote(spec, plan.threads)
        try:
            info = ray.get(actor.setup.remote())
            emit("setup", {**info, **dataclasses.asdict(plan)})
            chunk = max(1, info["batches_per_epoch"] // _CHUNKS_PER_EPOCH)
            while True:
                report = ray.get(actor.run.remote(chunk))
                emit("progress", report)
                if report["epoch_metrics"]:
                    m = report["epoch_metrics"]
                    log.info("epoch %d/%d: loss %.4f, accuracy %.4f, aux loss %.4f",
                             m["epoch"], spec.epochs, m["loss"], m["accuracy"], m["aux_loss"])
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
