"""Where a command runs: a local Ray started for it, an existing cluster, or a submitted job.

`--address` (or `RAY_ADDRESS`) picks one of three ways:

- absent: `connect()` starts a local Ray for this command with `address="local"` (it never
  attaches to a stray cluster it happens to find), sized to the machine, without dashboard,
  and shuts it down afterwards. If Ray is already initialised in this process (tests, `run`),
  `connect()` reuses it and leaves it running.
- `auto`, `host:port` (the GCS) or `ray://host:10001` (Ray Client): `connect()` attaches with
  `ray.init(address=...)`. Inside a submitted job Ray sets `RAY_ADDRESS` to the cluster's GCS,
  so the job's own command attaches to the cluster it runs on -- even a command given no
  address (`job_cluster_address()`): a job never starts a second, private Ray on the head.
- `http(s)://head:8265` (the dashboard): not for `ray.init`. `submit_job()` sends the same
  command line (minus `--address`) as a Ray job, streams its logs, and returns its exit code.

Unreachable addresses fail fast with a one-line `TTTPipeError` (a TCP probe with a short
timeout before Ray's own, much longer, retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from urllib.parse import urlparse

import ray
import torch

from pipeline.errors import TTTPipeError

__all__ = [
    "PROBE_TIMEOUT_S",
    "connect",
    "is_job_address",
    "job_cluster_address",
    "submit_job",
    "CLIENT_HINT",
    "strip_address",
    "actor_device",
    "cluster_resources",
]

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
_DEFAULT_PORTS = {"ray": 10001, "http": 8265, "https": 443, "": 6379}
_JOB_POLL_S = 1.0
_JOB_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray for a submitted job's entrypoint


def is_job_address(address: str | None) -> bool:
    """True for a dashboard address (`http(s)://...`), which takes a job, not `ray.init`."""
    return bool(address) and address.lower().startswith(("http://", "https://"))


def _host_port(address: str) -> tuple[str, int]:
    scheme = address.split("://", 1)[0].lower() if "://" in address else ""
    parsed = urlparse(address if "://" in address else f"//{address}")
    try:
        port = parsed.port
    except ValueError:
        raise TTTPipeError(f"bad cluster address {address!r}: the port is not a number") from None
    if not parsed.hostname:
        raise TTTPipeError(
            f"bad cluster address {address!r}; use auto, host:6379, ray://host:10001 or http://host:8265")
    return parsed.hostname, port or _DEFAULT_PORTS.get(scheme, 6379)


def _probe(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast (one line) when nothing listens at `address`."""
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise TTTPipeError(
            f"cannot reach the Ray cluster at {address} ({reason}); check the address, "
            "that the cluster is up (`ray status`), or omit --address to run locally") from None


def _quiet_ray_loggers() -> None:
    # The local cluster's token-auth notice is informational; keep the CLI's output clean.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def job_cluster_address() -> str | None:
    """Inside a submitted Ray job's command: the address of the cluster it runs on, else None.

    Ray's job supervisor gives the entrypoint `RAY_JOB_CONFIG_JSON_ENV_VAR` and `RAY_ADDRESS`
    (the GCS). A command there that was given no address (e.g. `ray job submit -- ttt-pipe
    adapt ...`) must attach to that cluster, not start a private local Ray on the head.
    """
    if _JOB_ENV_VAR not in os.environ:
        return None
    return os.environ.get("RAY_ADDRESS") or "auto"


@contextlib.contextmanager
def connect(address: str | None = None, num_cpus: int | None = None) -> Iterator[dict]:
    """Run the block connected to Ray; yield `cluster_resources()`.

    `address=None` starts (and afterwards stops) a local Ray with `num_cpus` CPUs (default:
    all of the machine's) -- except inside a submitted job, where it attaches to the job's
    cluster (`job_cluster_address()`). `auto`, `host:port` and `ray://...` attach to a
    running cluster.
    A dashboard address (`http://...`) raises: use `submit_job()` for it.
    """
    if is_job_address(address):
        raise TTTPipeError(
            f"{address} is a dashboard (job submission) address; the CLI submits the command "
            "there as a job, library code cannot ray.init it")
    if address is None:
        address = job_cluster_address()  # inside a submitted job: its cluster, not a new Ray
    if address not in (None, "local", "auto"):
        _probe(address)  # an unreachable address fails fast, even when Ray is already up
    if ray.is_initialized():
        log.debug("reusing the Ray already initialised in this process")
        yield cluster_resources()
        return
    _quiet_ray_loggers()
    if address is None or address == "local":
        kwargs = dict(address="local", num_cpus=num_cpus, include_dashboard=False)
    else:
        kwargs = dict(address=address)
    started = time.perf_counter()
    try:
        ray.init(**kwargs, logging_level=logging.WARNING, configure_logging=True)
    except (ConnectionError, RuntimeError, TimeoutError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        where = address or "a local Ray"
        raise TTTPipeError(
            f"cannot connect to {where}: {first}; check the address or omit --address to run locally"
        ) from None
    log.info("connected to Ray (%s) in %.1fs", address or "local", time.perf_counter() - started)
    try:
        yield cluster_resources()
    finally:
        ray.shutdown()


def cluster_resources() -> dict:
    """A summary of the connected cluster: alive nodes, total CPUs and GPUs."""
    total = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return {"nodes": nodes, "cpus": float(total.get("CPU", 0.0)), "gpus": float(total.get("GPU", 0.0))}


def actor_device() -> torch.device:
    """The torch device for code running inside a Ray task/actor.

    Ray gives an actor with `num_gpus>0` its GPUs by setting `CUDA_VISIBLE_DEVICES` to their
    physical ids (`ray.get_gpu_ids()`), and CUDA renumbers the visible devices from 0. So the
    actor's first GPU is `cuda:0`, not `cuda:<physical id>`. Only if Ray was told not to set
    the variable (`RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1`) is the physical id the
    torch index. An actor without GPUs (or without CUDA) gets the CPU.
    """
    gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
    if not gpu_ids or not torch.cuda.is_available():
        return torch.device("cpu")
    if os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES") == "1":
        return torch.device("cuda", int(gpu_ids[0]))
    return torch.device("cuda", 0)


def strip_address(argv: Sequence[str]) -> list[str]:
    """`argv` without `--address X` / `--address=X` (the job runs on the cluster itself)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--address":
            skip = True
            continue
        if arg.startswith("--address="):
            continue
        out.append(arg)
    return out


CLIENT_HINT = "pip install 'ttt-pipe[cluster]'"


def _job_client_class():
    """Ray's `JobSubmissionClient`, or a one-line error naming the install that provides it.

    The client's log stream needs aiohttp (part of `ray[default]`); without it Ray's SDK only
    fails *after* the job was submitted, so check before submitting anything.
    """
    try:
        import aiohttp  # noqa: F401
        from ray.job_submission import JobSubmissionClient
    except ImportError as exc:
        missing = getattr(exc, "name", None) or "ray[default]"
        raise TTTPipeError(
            f"submitting a job needs Ray's job-submission client ({missing} is not installed): "
            f"{CLIENT_HINT}") from None
    return JobSubmissionClient


def _first_line(text: str | None) -> str:
    line = ((text or "").strip().splitlines() or [""])[0]
    return line.split(", last available logs")[0].rstrip(":. ")


def _failure(job_id: str, status, info) -> tuple[str, int]:
    """The one-line message and exit code for a job that ended without success."""
    code = getattr(info, "driver_exit_code", None)
    code = code if isinstance(code, int) and 0 < code < 256 else 1
    message = f"job {job_id} {status.value.lower()}: {_first_line(info.message) or 'no message'}"
    if code == 127:  # the shell found no `ttt-pipe`
        message += ("; install ttt-pipe on every node and start Ray from that environment "
                    "(the job's PATH is the one `ray start` ran with)")
    return message, code


def submit_job(address: str, argv: Sequence[str], *, program: str = "ttt-pipe",
               runtime_env: dict | None = None, out=None) -> int:
    """Submit `program argv` as a Ray job to the dashboard at `address`, stream its logs.

    `--address` is left out: Ray sets `RAY_ADDRESS` for the job, so its command attaches to
    the cluster it runs on. Returns 0 when the job succeeded, else the
    job's exit code (1 if unknown); a failed job's reason is logged as one line. Paths in
    `argv` are read on the cluster: use storage every node can read (`s3://...`). Ctrl-C
    stops the job and re-raises. Needs `ray[default]` (`CLIENT_HINT`).
    """
    _probe(address)
    client_class = _job_client_class()
    from ray.job_submission import JobStatus

    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)
    out = out or sys.stdout
    entrypoint = shlex.join([program, *strip_address(argv)])
    try:
        client = client_class(address)
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    except Exception as exc:  # noqa: BLE001 -- Ray raises bare Exception/RuntimeError/ConnectionError
        if isinstance(exc, TTTPipeError):
            raise
        raise TTTPipeError(f"cannot submit the job to {address}: {_first_line(str(exc)) or type(exc).__name__}"
                           ) from None
    log.info("submitted job %s to %s: %s", job_id, address, entrypoint)

    async def _tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    try:
        try:
            asyncio.run(_tail())
        except (ConnectionError, RuntimeError, OSError) as exc:  # e.g. the websocket dropped
            log.warning("log stream of job %s ended early (%s); waiting for its status",
                        job_id, _first_line(str(exc)) or type(exc).__name__)
        status = client.get_job_status(job_id)
        while not status.is_terminal():  # the log stream can end just before the status flips
            time.sleep(_JOB_POLL_S)
            status = client.get_job_status(job_id)
    except KeyboardInterrupt:
        try:
            client.stop_job(job_id)
            log.warning("stopped job %s", job_id)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not stop job %s (%s): ray job stop --address %s %s",
                        job_id, _first_line(str(exc)), address, job_id)
        raise
    if status == JobStatus.SUCCEEDED:
        return 0
    message, code = _failure(job_id, status, client.get_job_info(job_id))
    log.error("%s", message)
    return code
