"""Data-parallel training (`ttt-pipe train --workers N`, N > 1) through Ray Train's `TorchTrainer`.

Each of the N Ray Train workers runs the same `jobs.train.Trainer` (same data, model, auxiliary
part, seed) with a Ray-free parallel hook (pipeline/training/parallel.py):

- the engine (model + the method's auxiliary part) is ONE module, `JointLoss`, wrapped by
  `ray.train.torch.prepare_model` (DistributedDataParallel; gloo on the CPU, NCCL on GPUs), so
  every trainable parameter's gradient is averaged across the workers;
- rank r trains on `order[r::N]` of each epoch's seeded permutation: the shards are disjoint and
  their union is the single-worker epoch;
- the epoch's loss / aux loss / correct sums are all-reduced, so logged metrics are global;
- rank 0 alone writes the per-epoch resume state and the checkpoint (same files and format as
  the single worker; the manifest also records `workers` and `global_batch_size`).

`--batch-size` is PER WORKER (global batch = batch size x N) and the learning rate is not
rescaled. A killed run resumes from the last finished epoch like the single worker (every rank
reads rank 0's state), given the same `--workers`. The GPU path (`use_gpu`, devices from
`ray.train.torch.get_device()`) is untested (no GPU here). Progress is live: rank 0 sends its
setup and a report every 1/20 epoch (as the single trainer's chunks) through a Ray queue that the
driver reads while `fit()` runs in a thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Callable

from jobs.cluster import connect
from pipeline import storage
from pipeline.errors import TTTPipeError

__all__ = ["RECORD_ENV", "check_fits", "train_parallel"]

log = logging.getLogger(__name__)

RECORD_ENV = "TTT_PIPE_TRAIN_TEST_RECORD"  # test hook: each rank writes rank<r>.json there


def check_fits(workers: int, cpus: float, gpus: float, nodes: list[dict]) -> None:
    """One-line error when the alive nodes cannot hold `workers` workers of (cpus, gpus) each."""
    fit = 0
    for node in nodes:
        res = node.get("Resources", {})
        per = math.floor(res.get("CPU", 0.0) / cpus + 1e-9) if cpus > 0 else workers
        if gpus > 0:
            per = min(per, math.floor(res.get("GPU", 0.0) / gpus + 1e-9))
        fit += per
    if fit < workers:
        need = f"{cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus > 0 else "")
        raise TTTPipeError(f"--workers {workers} needs {workers} x ({need}) but the cluster fits "
                           f"{fit}; pass --workers {max(1, fit)} or less, or lower --cpus")


def _worker(config: dict) -> None:
    """One Ray Train worker: train its shard, rank 0 writes state and checkpoint."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from jobs.train import Trainer, progress_chunk

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    def all_reduce(t: torch.Tensor) -> None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)

    parallel = {"rank": rank, "world_size": world, "device": device, "all_reduce": all_reduce,
                "wrap": lambda module: ray.train.torch.prepare_model(module, move_to_device=device)}
    trainer = Trainer(config["spec"], config["threads"],
                      config["kill_marker"] if rank == 0 else None, parallel=parallel)
    info = trainer.setup()
    events = config["events"] if rank == 0 else None  # live progress for the driver
    if events is not None:
        events.put(("setup", info))
    chunk = progress_chunk(info["batches_per_epoch"])  # the same on every rank
    while True:
        report = trainer.run(chunk)
        if events is not None:
            events.put(("progress", report))
        if report["finished"]:
            break
    if config["record"]:  # test hook: this rank's last epoch rows and final weights
        from pipeline.checkpoint import _state_dict_bytes

        weights = _state_dict_bytes({k: v.cpu() for k, v in trainer.engine.state_dict().items()})
        with open(os.path.join(config["record"], f"rank{rank}.json"), "w") as f:
            json.dump({"rank": rank, "world_size": world, "rows": trainer.loop.order.cpu().tolist(),
                       "weights_sha256": hashlib.sha256(weights).hexdigest(),
                       "info": info}, f)
    if rank == 0:
        trainer.save()
    dist.barrier()  # the run ends when rank 0's checkpoint is written


def _read_manifest(out: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(out, "manifest.json")))


def train_parallel(spec, address: str | None = None,
                   on_event: Callable[[str, dict], None] | None = None) -> dict:
    """Train `spec` (spec.workers > 1) on Ray Train; return the written checkpoint's manifest.

    Events as `jobs.train.train`, live from rank 0: ("setup", ...), ("progress", ...) every
    1/20 epoch, then ("saved", manifest)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue

    from jobs.pool import actor_env
    from jobs.train import KILL_ENV, alive_nodes, plan_trainer

    emit = on_event or (lambda kind, info: None)
    with connect(address) as resources:
        alive, max_node_cpus = alive_nodes()
        plan = plan_trainer(spec.gpus, resources["gpus"], max_node_cpus, local=address is None,
                            cpus=max(1.0, spec.cpus))
        cpus = 1.0 if plan.num_gpus > 0 else spec.cpus
        try:
            check_fits(spec.workers, cpus, plan.num_gpus, alive)
        except TTTPipeError as exc:
            if address is None:
                raise
            # a remote cluster may autoscale: warn, Ray Train waits for the resources
            log.warning("%s (waiting: the autoscaler may add nodes)", exc)
        resources_per_worker = {"CPU": cpus, **({"GPU": plan.num_gpus} if plan.num_gpus else {})}
        scratch = tempfile.mkdtemp(prefix="ttt-pipe-train-")
        events = Queue(actor_options={"num_cpus": 0})  # takes no CPU from the workers
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"spec": spec, "threads": max(1, math.floor(cpus)),
                               "kill_marker": os.environ.get(KILL_ENV),
                               "record": os.environ.get(RECORD_ENV), "events": events},
            scaling_config=ScalingConfig(num_workers=spec.workers, use_gpu=plan.num_gpus > 0,
                                         resources_per_worker=resources_per_worker),
            run_config=RunConfig(name="ttt-pipe-train", storage_path=scratch,
                                 failure_config=FailureConfig(max_failures=0),
                                 worker_runtime_env={"env_vars": actor_env()}),
        )
        failure: list[BaseException] = []

        def fit() -> None:
            try:
                trainer.fit()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the driver's thread
                failure.append(exc)

        runner = threading.Thread(target=fit, name="ttt-pipe-train-fit", daemon=True)
        runner.start()
        try:
            while runner.is_alive() or not events.empty():
                try:
                    kind, info = events.get(timeout=0.5)
                except Empty:
                    continue
                if kind == "setup":
                    info = {**info, "workers": spec.workers, "num_cpus": cpus, "num_gpus": plan.num_gpus}
                emit(kind, info)
            runner.join()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            events.shutdown()
        if failure:  # Ray Train wraps the worker's error
            raise TTTPipeError(f"data-parallel training failed: {_first_cause(failure[0])}") from None
        manifest = _read_manifest(spec.out)
    emit("saved", manifest)
    return manifest


def _first_cause(exc: BaseException) -> str:
    """The innermost error's first line (TTTPipeError messages pass through unchanged)."""
    seen = exc
    for _ in range(10):
        inner = getattr(seen, "cause", None) or seen.__cause__
        if inner is None:
            break
        seen = inner
    failures = getattr(exc, "worker_failures", None) or {}
    if failures:  # Ray Train's per-worker errors: the first worker's
        seen = next(iter(failures.values()))
    text = str(seen).strip().splitlines()
    last = [line for line in text if line.strip()]
    pipe = [line for line in last if "TTTPipeError" in line]
    if pipe:
        return pipe[-1].split("TTTPipeError:", 1)[-1].strip()
    line = (last[-1] if last else type(seen).__name__).split(". ")[0].strip()
    if "dead" in line or "died" in line:  # killed: out of memory, node lost, ...
        line += "; check memory and `ray status`, then rerun (it resumes after the last finished epoch)"
    return line
