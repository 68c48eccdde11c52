"""Your own model through the real CLI: `--model package.module:factory` trains and adapts on
Ray (the module re-imported by every actor), a checkpoint naming an import path adapts only
when its module is trusted, and bad factories fail in one line with nothing written."""

from __future__ import annotations

import json
import logging
import os
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from jobs.cli import app

pytestmark = pytest.mark.ray

PACKAGE = "ttt_pipe_test_user_nets"
NETS = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, hidden=16, num_classes=10, in_channels=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(8 * 16, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv(x))).flatten(1)
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def make(hidden=16, num_classes=10):
    return TinyNet(hidden, num_classes)


def rgb_only():
    return TinyNet(in_channels=3)


def not_a_module():
    return "a string"
'''


@pytest.fixture(scope="module")
def user_ray(tmp_path_factory, ray_cluster):
    """A local Ray whose workers can import the test's own package (written to a temp dir and
    put on PYTHONPATH before the workers start, as an installed package would be); the shared
    session cluster is left for this module and rejoined afterwards."""
    import ray

    root = tmp_path_factory.mktemp("userpkg")
    (root / PACKAGE).mkdir()
    (root / PACKAGE / "__init__.py").write_text("")
    (root / PACKAGE / "nets.py").write_text(textwrap.dedent(NETS))
    ray.shutdown()  # leave the shared cluster (its nodes stay up) for this module's own Ray
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
        mp.syspath_prepend(str(root))
        mp.delenv("TTT_PIPE_TRUSTED_MODULES", raising=False)
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
        try:
            yield root
        finally:
            ray.shutdown()
            sys.modules.pop(f"{PACKAGE}.nets", None)
            sys.modules.pop(PACKAGE, None)
    # back to the shared cluster itself (tests/jobs/conftest.py), not a new local Ray: the
    # autoscaling tests add nodes to that cluster and wait for them
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        ray.init(address=ray_cluster.address, logging_level=logging.WARNING)


def _run(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, list(args), env=env)


def _error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    return errors[0]


def _train(idx_dir, out, model, *extra):
    return _run("train", "--method", "ttt", "--dataset", "mnist", "--data-dir", str(idx_dir / "mnist"),
                "--out", str(out), "--limit", "32", "--batch-size", "16", "--epochs", "1",
                "--model", model, *extra)


def test_own_factory_trains_and_adapts_only_when_trusted(user_ray, idx_dir, shard_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    result = _train(idx_dir, ckpt, f"{PACKAGE}.nets:make", "--model-kwargs", '{"hidden": 12}',
                    "--layer", "fc2", "--normalize", "dataset")
    assert result.exit_code == 0, result.output
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["model"] == {"name": f"{PACKAGE}.nets:make", "kwargs": {"hidden": 12},
                                 "normalize": "dataset", "mean": 0.1307, "std": 0.3081}
    assert manifest["method"]["config"]["layer"] == "net.fc2"  # behind the Normalize wrapper

    untrusted = tmp_path / "untrusted"
    result = _run("adapt", "--checkpoint", str(ckpt), "--shards", str(shard_dir), "--out", str(untrusted))
    assert result.exit_code == 1
    line = _error_line(result)
    assert f"--trust-model {PACKAGE}.nets" in line and "TTT_PIPE_TRUSTED_MODULES" in line
    assert not untrusted.exists()

    results = tmp_path / "results"
    result = _run("adapt", "--checkpoint", str(ckpt), "--shards", str(shard_dir), "--out", str(results),
                  "--steps", "1", "--actors", "1", "--trust-model", PACKAGE)
    assert result.exit_code == 0, result.output
    assert len(list((results / "predictions").glob("*.parquet"))) == len(list(shard_dir.glob("*.parquet")))

    by_env = tmp_path / "by-env"  # the environment variable works the same, also in the actors
    result = _run("adapt", "--checkpoint", str(ckpt), "--shards", str(shard_dir / "identity-s0-00000.parquet"),
                  "--out", str(by_env), "--steps", "1", "--actors", "1",
                  env={"TTT_PIPE_TRUSTED_MODULES": f"other.pkg,{PACKAGE}.nets"})
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("model, extra, words", [
    (f"{PACKAGE}.nets:not_a_module", [], "returned a str, not a torch.nn.Module"),
    ("ttt_pipe_no_such_pkg.nets:make", [], "cannot import module 'ttt_pipe_no_such_pkg.nets'"),
    (f"{PACKAGE}.nets:missing", [], f"module '{PACKAGE}.nets' has no 'missing'"),
    (f"{PACKAGE}.nets:make", [], "has no default ttt layer; pass --layer \\(one of: conv, pool, fc1"),
    (f"{PACKAGE}.nets:make", ["--layer", "fc2", "--model-kwargs", "[1]"], "must be a JSON object"),
    (f"{PACKAGE}.nets:make", ["--layer", "fc2", "--model-kwargs", '{"colour": 1}'], "unexpected keyword"),
    ("nets-without-colon", [], "unknown model 'nets-without-colon'"),
    # fails inside the trainer actor, on the data's real shape: one line naming layer and shape
    (f"{PACKAGE}.nets:rgb_only", ["--layer", "fc2"],
     "fails the ttt engine's dry run on input \\(1, 1, 28, 28\\) at layer 'fc2'"),
])
def test_bad_own_models_are_one_line_errors_and_write_nothing(user_ray, idx_dir, tmp_path, model, extra, words):
    out = tmp_path / "ckpt"
    result = _train(idx_dir, out, model, *extra)
    assert result.exit_code == 1, result.output
    import re
    assert re.search(words, _error_line(result)), result.output
    assert list(tmp_path.iterdir()) == []
