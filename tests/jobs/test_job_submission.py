"""Real Ray job submission: a throwaway head with a dashboard, commands sent to it over HTTP.

The module fixture starts `ray start --head --block` in its own session (process group) with
its own temp dir and free ports, so it never meets the shared `ray_local` test cluster or any
other Ray on the machine, and tears it down by that group id only (never `ray stop`, which
stops every Ray of the machine). Needs the job client (`ray[default]`: aiohttp); skipped
without it. The head carries a custom resource `ttt_head` so a job can prove which cluster
it attached to.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from jobs import cluster
from pipeline.errors import TTTPipeError

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 60
JOB_TIMEOUT_S = 90


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):  # held open together, so the ports are distinct
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def _stop_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the head's process group (ours alone), SIGKILL what is left after `grace_s`
    (a throwaway head: its GCS can take 20 s and more to leave on SIGTERM)."""
    pgid = proc.pid  # start_new_session=True: the group id is the `ray start` pid
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            proc.poll()
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.25)


@pytest.fixture(scope="module")
def dashboard():
    """`http://127.0.0.1:<port>` of a fresh single-node head (2 CPUs, resource ttt_head=1)."""
    pytest.importorskip("aiohttp", reason="job submission needs ray[default]: pip install 'ttt-pipe[cluster]'")
    if not (BIN / "ray").exists() or not (BIN / "ttt-pipe").exists():
        pytest.skip("the ray / ttt-pipe scripts are not next to this Python")
    gcs, dash, client, agent_grpc, agent_http, metrics, runtime_env = _free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="ttt-ray-", dir="/tmp")  # short: Ray's unix sockets live here
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "TTT_PIPE_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
           "--num-cpus", "2", "--resources", json.dumps({"ttt_head": 1}), "--temp-dir", temp_dir,
           "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--ray-client-server-port", str(client), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--dashboard-agent-listen-port", str(agent_http), "--metrics-export-port", str(metrics),
           "--runtime-env-agent-port", str(runtime_env)]
    log = open(Path(temp_dir) / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}: "
                            f"{(Path(temp_dir) / 'head.log').read_text()[-2000:]}")
            try:
                _get_json(f"{address}/api/version")
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"no dashboard at {address} after {START_TIMEOUT_S}s")
                time.sleep(0.5)
        yield address
    finally:
        _stop_group(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([str(BIN / "ttt-pipe"), *args], capture_output=True, text=True,
                          timeout=JOB_TIMEOUT_S, env=env, stdin=subprocess.DEVNULL)


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_submitted_job_runs_on_the_cluster_and_writes_its_files(dashboard, tmp_path):
    out = tmp_path / "shards"
    code = cluster.submit_job(dashboard, [
        "corrupt", "--dataset", "fashion-mnist", "--corruptions", "gaussian_noise",
        "--severities", "5", "--limit", "16", "--data-dir", str(_idx(tmp_path)), "--out", str(out)])
    assert code == 0
    assert sorted(p.name for p in out.glob("*.parquet")) == [
        "gaussian_noise-s5-00000.parquet", "identity-s0-00000.parquet"]


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_failed_job_exits_non_zero_with_the_jobs_error_line(dashboard, tmp_path):
    missing = tmp_path / "no-checkpoint"
    result = _cli("adapt", "--checkpoint", str(missing), "--shards", str(tmp_path),
                  "--out", str(tmp_path / "res"), "--address", dashboard)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"error: no checkpoint at {missing}" in output  # streamed from the job
    assert "Running entrypoint for job" in output and "failed" in output
    assert not (tmp_path / "res").exists()


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_a_command_inside_a_job_attaches_to_that_cluster(dashboard, capsys):
    # connect() with no address, as `ttt-pipe adapt` does inside a job: it must find the
    # head (custom resource ttt_head) instead of starting a private local Ray.
    code = ("from jobs.cluster import connect; import ray\n"
            "with connect() as res:\n"
            "    print('ttt_head', ray.cluster_resources().get('ttt_head'), res['nodes'])")
    assert cluster.submit_job(dashboard, ["-c", code], program=sys.executable) == 0
    assert "ttt_head 1.0 1" in capsys.readouterr().out


def _idx(tmp_path: Path) -> Path:
    from helpers import write_dataset

    root = tmp_path / "idx"
    write_dataset(root, n_train=16, n_test=16, gz=False, seed=3)
    return root


def test_job_cluster_address_only_inside_a_job(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cluster.job_cluster_address() is None  # a stray RAY_ADDRESS is not a job
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert cluster.job_cluster_address() == "10.0.0.1:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    assert cluster.job_cluster_address() == "auto"


def test_missing_job_client_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setattr(cluster, "_probe", lambda address, timeout=0: None)
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # as without ray[default]
    with pytest.raises(TTTPipeError) as info:
        cluster.submit_job("http://h:8265", ["train"])
    message = str(info.value)
    assert "\n" not in message and "aiohttp" in message and cluster.CLIENT_HINT in message
    assert "ttt-pipe[cluster]" in cluster.CLIENT_HINT


def test_a_job_that_finds_no_ttt_pipe_names_the_fix():
    from ray.job_submission import JobStatus

    info = type("Info", (), {"message": "Job entrypoint command failed with exit code 127, "
                                        "last available logs (truncated to 20,000 chars):\nx",
                             "driver_exit_code": 127})()
    message, code = cluster._failure("raysubmit_1", JobStatus.FAILED, info)
    assert code == 127 and "\n" not in message
    assert message.startswith("job raysubmit_1 failed: Job entrypoint command failed with exit code 127;")
    assert "install ttt-pipe on every node" in message
