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
