"""The adaptation pool: sizing (no Ray), and autoscaling on a real multi-node Ray cluster.

On `ray.cluster_utils.Cluster` (the shared fixture) with logical GPUs (`num_gpus=1` nodes,
actors run on the CPU since there is no CUDA):
- GPU actors asked for before any GPU node exists wait (with a message) instead of failing;
  the pool starts when a node joins and grows when a second one joins;
- a node removed mid-run: the shard its actor was adapting goes to another actor;
- in both, the predictions are byte-identical to a 1-actor CPU run (same threads), and
  every shard has exactly one prediction per (sample, step).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import pytest
from adapt_fixtures import assert_complete, read_predictions, ttt_checkpoint  # noqa: F401

from jobs.adapt import AdaptRequest, run_adapt
from jobs.pool import parse_actors, plan_pool
from pipeline.errors import TTTPipeError

STEPS = 2
SHARD_SIZE = 4  # 32 test samples x (identity, gaussian_noise) -> 16 shards


# --- sizing: no Ray ---------------------------------------------------------------------

def test_gpus_not_up_yet_are_planned_and_wait():
    plan = plan_pool({"cpus": 2, "gpus": 0}, 8, 2, 1, 1)  # the README's cluster example, GPUs idle
    assert (plan.actors, plan.min_actors, plan.num_gpus, plan.waits) == (2, 2, 1, True)
    grow = plan_pool({"cpus": 2, "gpus": 0}, 8, "1:4", 1, 1)
    assert (grow.min_actors, grow.actors, grow.waits) == (1, 4, True)
    assert not plan_pool({"cpus": 8, "gpus": 2}, 8, 2, 1, 1).waits
    assert plan_pool({"cpus": 8, "gpus": 0}, 8, None, 1, 1).actors == 1  # default: one, waiting


def test_cpu_pools_share_cores_locally_and_wait_on_a_cluster():
    local = plan_pool({"cpus": 2, "gpus": 0}, 8, 4, 1, 0)
    assert (local.actors, local.num_cpus, local.waits) == (4, 0.5, False)
    cluster = plan_pool({"cpus": 2, "gpus": 0}, 8, 4, 1, 0, autoscale=True)
    assert (cluster.actors, cluster.num_cpus, cluster.waits) == (4, 1, True)
    assert plan_pool({"cpus": 2, "gpus": 0}, 3, "2:10", 1, 0).actors == 3  # never more than shards
    assert plan_pool({"cpus": 4, "gpus": 0}, 8, None, 1, 0).actors == 4
    with pytest.raises(TTTPipeError, match="MIN"):
        plan_pool({"cpus": 2, "gpus": 0}, 8, "3:4", 1, 0)


@pytest.mark.parametrize("value, expected", [
    (None, (None, None)), (3, (3, 3)), ("3", (3, 3)), ("2:5", (2, 5)), (" 1:1 ", (1, 1)), ((1, 2), (1, 2))])
def test_parse_actors(value, expected):
    assert parse_actors(value) == expected


@pytest.mark.parametrize("value", ["0", "5:2", "a:b", "1:2:3", "", 0, True, ":3", "2.5"])
def test_parse_actors_rejects_bad_values_in_one_line(value):
    with pytest.raises(TTTPipeError) as err:
        parse_actors(value)
    assert "\n" not in str(err.value) and "MIN:MAX" in str(err.value)


# --- a real cluster ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_shards(idx_dir, tmp_path_factory) -> Path:
    from pipeline.shard_maker import make_shards

    out = tmp_path_factory.mktemp("small-shards")
    make_shards("mnist", str(out), "gaussian_noise", "5", data_dir=idx_dir / "mnist",
                shard_size=SHARD_SIZE, seed=0)
    return out


@pytest.fixture(scope="module")
def samples(small_shards) -> dict[str, int]:
    return {p.stem: SHARD_SIZE for p in Path(small_shards).glob("*.parquet")}


@pytest.fixture(scope="module")
def reference(ray_local, ttt_checkpoint, small_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pool-ref") / "results"
    run_adapt(AdaptRequest(ttt_checkpoint, str(small_shards), str(out), actors=1))
    return out


def _same_bytes(a: Path, b: Path) -> None:
    names = sorted(read_predictions(a))
    assert names == sorted(read_predictions(b))
    for name in names:
        assert (a / "predictions" / f"{name}.parquet").read_bytes() == \
            (b / "predictions" / f"{name}.parquet").read_bytes(), name


def _hold_until(predicate, budget_s: float, step_s: float = 0.5) -> None:
    """Block the driver (an `on_shard_done` hook) until `predicate()` or the budget is spent."""
    deadline = time.monotonic() + budget_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(step_s)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_gpu_pool_waits_for_nodes_and_grows_when_they_join(
        reference, ttt_checkpoint, small_shards, samples, nodes, tmp_path, caplog):
    out = tmp_path / "results"
    seen: set[int] = set()

    class Autoscaler(logging.Handler):
        """Plays the autoscaler: a GPU node joins when the pool says it waits for one."""

        def emit(self, record):
            if "waiting for" in record.getMessage() and not nodes.added:
                time.sleep(1.0)  # the actor is pending meanwhile
                nodes.add()

    def on_done(summary):
        seen.add(summary["pid"])
        if len(nodes.added) == 1:
            nodes.add()  # a second GPU node joins mid-run
        # hold the driver (bounded) so the second actor starts before the shards run out
        _hold_until(lambda: len(seen) > 1 or len(nodes.added) < 2, 3.0)

    handler = Autoscaler(level=logging.WARNING)
    logging.getLogger("jobs.pool").addHandler(handler)
    try:
        with caplog.at_level(logging.WARNING, logger="jobs.pool"):
            outcome = run_adapt(AdaptRequest(ttt_checkpoint, str(small_shards), str(out),
                                             actors="1:2", gpus_per_actor=1, address="auto"),
                                on_shard_done=on_done)
    finally:
        logging.getLogger("jobs.pool").removeHandler(handler)
    assert "waiting for 1 actor(s) x 1 GPU" in caplog.text
    assert outcome.pool.waits and outcome.timings["actors_ready"] == 2
    assert len({s["pid"] for s in outcome.shard_summaries}) == 2  # both adapted shards
    assert len({s["node"] for s in outcome.shard_summaries}) == 2
    assert_complete(out, samples, STEPS)
    _same_bytes(reference, out)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_node_removed_mid_run_its_shard_goes_to_another_actor(
        reference, ttt_checkpoint, small_shards, samples, nodes, tmp_path):
    out = tmp_path / "results"
    nodes.add()
    nodes.add()
    reported: set[str] = set()

    def on_done(summary):
        reported.add(summary["node"])
        if len(nodes.added) == 2:
            _hold_until(lambda: len(reported) == 2, 30.0)  # both actors at work
            if len(reported) == 2:
                # take away the node of the actor that just finished: the pool has its next
                # shard queued for it (prefetched), so that call must fail and be retried. Its
                # process goes too, at once: a worker outlives its killed raylet for a moment
                # and could still finish that shard. (Taking the other, busy, node raced its
                # shard finishing first.)
                nodes.remove(nodes.by_id(summary["node"]))
                os.kill(summary["pid"], signal.SIGKILL)

    outcome = run_adapt(AdaptRequest(ttt_checkpoint, str(small_shards), str(out), actors=2,
                                     gpus_per_actor=1, address="auto"), on_shard_done=on_done)
    assert len(nodes.added) == 1, "the test never removed a node"
    assert outcome.timings["retried"], "no shard was retried"
    assert len(outcome.shard_summaries) == len(samples)  # each shard written once (retries not)
    assert_complete(out, samples, STEPS)
    _same_bytes(reference, out)


def test_cli_takes_min_max_actors_and_rejects_bad_ones(tmp_path):
    from typer.testing import CliRunner

    from jobs.cli import app

    args = ["adapt", "--checkpoint", str(tmp_path / "ck"), "--shards", str(tmp_path / "s"),
            "--out", str(tmp_path / "o"), "--actors"]
    result = CliRunner().invoke(app, [*args, "5:2"], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "MIN:MAX" in result.output
    assert "MIN:MAX" in CliRunner().invoke(app, ["adapt", "--help"], env={"COLUMNS": "200"}).output
    result = CliRunner().invoke(app, [*args, "1:2"], env={"COLUMNS": "200"})
    assert result.exit_code == 1 and "error:" in result.output  # parsed; the checkpoint is missing
    assert not (tmp_path / "o").exists()


def test_actors_get_the_drivers_data_dir(ray_local, monkeypatch, tmp_path):
    """$TTT_PIPE_DATA set in the driver after Ray started (as on a cluster, where actors never
    inherit the driver's environment) reaches an actor started with `actor_env`."""
    from jobs.pool import actor_env

    @ray_local.remote(num_cpus=0.1)
    def data_dir():
        return os.environ.get("TTT_PIPE_DATA"), os.environ.get("MKL_CBWR")

    monkeypatch.setenv("TTT_PIPE_DATA", str(tmp_path))
    got = ray_local.get(data_dir.options(runtime_env={"env_vars": actor_env()}).remote())
    assert got == (str(tmp_path), os.environ.get("MKL_CBWR", "AUTO"))
    monkeypatch.delenv("TTT_PIPE_DATA")
    assert "TTT_PIPE_DATA" not in actor_env()
