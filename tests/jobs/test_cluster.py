"""Cluster connection: fast one-line errors for unreachable addresses, job-submission argv,
device choice inside actors, and the cluster.yaml launcher config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from jobs import cluster
from jobs.cli import app
from pipeline.errors import TTTPipeError

ROOT = Path(__file__).resolve().parents[2]
UNREACHABLE = ["ray://127.0.0.1:1", "127.0.0.1:1", "http://127.0.0.1:1"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("address", UNREACHABLE)
def test_unreachable_address_is_a_one_line_error(address):
    with pytest.raises(TTTPipeError) as info:
        if cluster.is_job_address(address):
            cluster.submit_job(address, ["train", "--address", address])
        else:
            with cluster.connect(address):
                pass
    assert "\n" not in str(info.value) and "cannot reach" in str(info.value)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("address", ["ray://127.0.0.1:1", "http://127.0.0.1:1"])
def test_train_cli_with_unreachable_address_exits_non_zero(address, tmp_path):
    out = tmp_path / "ckpt"
    result = CliRunner().invoke(app, ["train", "--method", "ttt", "--dataset", "mnist",
                                      "--out", str(out), "--address", address])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "127.0.0.1:1" in lines[0]
    assert not out.exists()


def test_bad_address_names_the_fix():
    with pytest.raises(TTTPipeError, match="not a number"):
        with cluster.connect("ray://head:port"):
            pass


def test_dashboard_address_is_not_for_ray_init():
    assert cluster.is_job_address("http://head:8265") and cluster.is_job_address("HTTPS://h")
    assert not any(map(cluster.is_job_address, [None, "", "auto", "ray://h:10001", "h:6379"]))
    with pytest.raises(TTTPipeError, match="job submission"):
        with cluster.connect("http://head:8265"):
            pass


def test_strip_address_keeps_everything_else():
    argv = ["train", "--address", "http://h:8265", "--out", "s3://b/c", "--address=x", "--seed", "1"]
    assert cluster.strip_address(argv) == ["train", "--out", "s3://b/c", "--seed", "1"]


def test_actor_device_follows_ray_gpu_ids(monkeypatch):
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(cluster.torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(cluster.ray, "get_gpu_ids", lambda: [3])
    # Ray set CUDA_VISIBLE_DEVICES=3, so torch sees that GPU as index 0
    assert cluster.actor_device() == torch.device("cuda", 0)
    monkeypatch.setenv("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "1")
    assert cluster.actor_device() == torch.device("cuda", 3)
    monkeypatch.setattr(cluster.ray, "get_gpu_ids", lambda: [])
    assert cluster.actor_device() == torch.device("cpu")


def test_connect_reuses_an_initialised_ray_and_reports_resources(ray_local):
    with cluster.connect(None) as resources:
        assert resources["cpus"] == 2.0 and resources["nodes"] >= 1 and resources["gpus"] == 0.0
    assert ray_local.is_initialized()  # not shut down: it was not ours

    @ray_local.remote(num_cpus=0)
    def device() -> str:
        return str(cluster.actor_device())

    assert ray_local.get(device.remote()) == "cpu"


def test_cluster_yaml_validates_against_rays_schema():
    import json

    import jsonschema
    import ray
    import yaml

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    workers = {name: node for name, node in config["available_node_types"].items()
               if name != config["head_node_type"]}
    assert config["available_node_types"][config["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert any(node["resources"].get("GPU", 0) >= 1 and node["min_workers"] == 0
               for node in workers.values())
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "fashion" in setup.lower()
    installs = [c for c in config["setup_commands"] if "ttt-pipe" in c and "pip install" in c]
    assert installs and not [c for c in installs if " -e " in c]  # a package install, not editable


class _FakeJobClient:
    """Stands in for JobSubmissionClient (a real one needs a dashboard: ray[default])."""

    submitted: list[str] = []

    def __init__(self, address):
        self.address, self.polls = address, 0

    def submit_job(self, entrypoint, runtime_env=None):
        self.submitted.append(entrypoint)
        return "job-1"

    async def tail_job_logs(self, job_id):
        for chunk in ("epoch 1/1: loss 0.5\n", "checkpoint s3://b/ck\n"):
            yield chunk

    def get_job_status(self, job_id):
        from ray.job_submission import JobStatus

        self.polls += 1  # the stream may end before the status turns terminal
        return JobStatus.RUNNING if self.polls == 1 else self.final

    def get_job_info(self, job_id):
        return type("Info", (), {"message": "Job failed: exit 1"})()


@pytest.mark.parametrize("final, code", [("SUCCEEDED", 0), ("FAILED", 1)])
def test_submit_job_streams_logs_and_returns_the_jobs_status(monkeypatch, final, code):
    import io

    import ray.job_submission as js

    _FakeJobClient.final = getattr(js.JobStatus, final)
    _FakeJobClient.submitted = []
    monkeypatch.setattr(js, "JobSubmissionClient", _FakeJobClient)
    monkeypatch.setattr(cluster, "_probe", lambda address, timeout=0: None)
    monkeypatch.setattr(cluster, "_JOB_POLL_S", 0.0)
    out = io.StringIO()
    argv = ["train", "--method", "ttt", "--out", "s3://b/my ck", "--address", "http://h:8265"]
    assert cluster.submit_job("http://h:8265", argv, out=out) == code
    assert _FakeJobClient.submitted == ["ttt-pipe train --method ttt --out 's3://b/my ck'"]
    assert out.getvalue() == "epoch 1/1: loss 0.5\ncheckpoint s3://b/ck\n"


def test_train_cli_submits_itself_to_a_dashboard_address(monkeypatch, tmp_path):
    calls = []

    def fake_submit(address, argv, **kwargs):
        calls.append((address, argv))
        return 0

    monkeypatch.setattr(cluster, "submit_job", fake_submit)
    result = CliRunner().invoke(app, ["train", "--method", "it3", "--dataset", "fashion-mnist",
                                      "--out", "s3://b/ck", "--epochs", "3", "--gpus", "1",
                                      "--address", "http://head:8265"])
    assert result.exit_code == 0, result.output
    address, argv = calls[0]
    assert address == "http://head:8265" and "--address" not in argv
    assert argv == ["train", "--method", "it3", "--dataset", "fashion-mnist", "--out", "s3://b/ck",
                    "--epochs", "3", "--seed", "0", "--gpus", "1.0", "--cpus", "1.0"]
