"""`ttt-pipe adapt` on a real local Ray: the pool's invariants.

- predictions are identical with 1 or 2 actors and across reruns (byte-identical files);
- an actor killed mid-shard: the run completes, one prediction per (sample, step), same result;
- the driver interrupted after a shard and rerun: finished shards are skipped, same result;
- online mode (reset at every shard start): same with 1 or 2 actors;
- no hidden temp file or partial output is ever left in the results folder (stale temp
  files of killed writers are removed).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from adapt_fixtures import assert_complete, listing, read_predictions, ttt_checkpoint  # noqa: F401

from jobs.adapt import KILL_ENV, AdaptRequest, run_adapt
from pipeline.results import read_results

pytestmark = pytest.mark.ray

STEPS = 2


@pytest.fixture(scope="module")
def samples(shard_dir) -> dict[str, int]:
    return {p.stem: 16 for p in Path(shard_dir).glob("*.parquet")}


@pytest.fixture(scope="module")
def reference(ray_local, ttt_checkpoint, shard_dir, tmp_path_factory):
    """A clean run with one actor: the results every other run must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "results"
    outcome = run_adapt(AdaptRequest(ttt_checkpoint, str(shard_dir), str(out), actors=1))
    assert outcome.pool.actors == 1
    return out


def _same_predictions(a: Path, b: Path) -> None:
    ta, tb = read_predictions(a), read_predictions(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:  # same bytes: a retried or resumed shard rewrites exactly the same file
        assert (a / "predictions" / f"{name}.parquet").read_bytes() == \
            (b / "predictions" / f"{name}.parquet").read_bytes(), name
    for name in ta:
        assert ta[name].schema == tb[name].schema and ta[name].num_rows == tb[name].num_rows
        for column in ta[name].column_names:  # (Table.equals: NaN != NaN in the loss column)
            x, y = ta[name].column(column).to_numpy(), tb[name].column(column).to_numpy()
            assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), (name, column)
    assert pq.read_table(a / "accuracy.parquet").equals(pq.read_table(b / "accuracy.parquet"))


def test_reference_run_is_complete(reference, samples):
    assert_complete(reference, samples, STEPS)
    results = read_results(str(reference))
    assert results.complete and len(results.run["shards"]) == 4
    assert results.accuracy.num_rows == 2 * (STEPS + 1)  # (identity, gaussian_noise) x steps


def test_two_actors_give_identical_bytes(reference, ttt_checkpoint, shard_dir, samples, tmp_path):
    out = tmp_path / "two"
    done: list[int] = []

    def hold_first(summary):  # the pool dispatches as soon as one actor is up: on an idle
        done.append(summary["pid"])  # machine that one could take all 4 tiny shards before the
        if len(done) == 1:  # second has started, so hold the driver (bounded) after the first
            time.sleep(15.0)

    outcome = run_adapt(AdaptRequest(ttt_checkpoint, str(shard_dir), str(out), actors=2),
                        on_shard_done=hold_first)
    assert outcome.pool.actors == 2
    assert len({s["pid"] for s in outcome.shard_summaries}) == 2  # both actors worked
    assert_complete(out, samples, STEPS)
    _same_predictions(reference, out)


def test_online_mode_does_not_depend_on_the_actor_count(ray_local, ttt_checkpoint, shard_dir,
                                                        samples, tmp_path):
    for actors in (1, 2):
        run_adapt(AdaptRequest(ttt_checkpoint, str(shard_dir), str(tmp_path / str(actors)),
                               actors=actors, mode="online"))
        assert_complete(tmp_path / str(actors), samples, STEPS)
    _same_predictions(tmp_path / "1", tmp_path / "2")


def test_actor_killed_mid_shard_is_restarted_and_nothing_is_lost(
        reference, ttt_checkpoint, shard_dir, samples, tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_ENV, str(marker))
    out = tmp_path / "results"
    outcome = run_adapt(AdaptRequest(ttt_checkpoint, str(shard_dir), str(out), actors=2))
    assert marker.exists(), "the test hook did not kill an actor"
    assert "died after batch 0" in marker.read_text()
    pids = {s["pid"] for s in outcome.shard_summaries}
    assert int(marker.read_text().split()[0]) not in pids  # the dead actor finished nothing
    assert_complete(out, samples, STEPS)
    _same_predictions(reference, out)


def test_driver_interrupted_then_rerun_skips_finished_shards(
        reference, ttt_checkpoint, shard_dir, samples, tmp_path):
    out = tmp_path / "results"
    req = AdaptRequest(ttt_checkpoint, str(shard_dir), str(out), actors=2)

    def interrupt(summary):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_adapt(req, on_shard_done=interrupt)
    done = sorted(p.name for p in (out / "predictions").glob("*.parquet"))
    assert 1 <= len(done) < 4
    files = listing(out)
    assert "accuracy.parquet" not in files and not any("/." in f or f.startswith(".") for f in files)
    partial = read_results(str(out))
    assert not partial.complete and partial.missing_shards

    stale = out / "predictions" / ".gaussian_noise-s5-00001.parquet.abc123.tmp"
    stale.write_bytes(b"half a file, as a writer killed mid-write leaves it")
    outcome = run_adapt(req)
    assert len(outcome.shard_summaries) == 4 - len(done)  # finished shards were skipped
    assert not {s["shard"] for s in outcome.shard_summaries} & {Path(d).stem for d in done}
    assert not stale.exists()
    assert_complete(out, samples, STEPS)
    _same_predictions(reference, out)
    # nothing left to do: no Ray work at all, same files
    outcome = run_adapt(req)
    assert outcome.pool is None and outcome.shard_summaries == []
    _same_predictions(reference, out)
