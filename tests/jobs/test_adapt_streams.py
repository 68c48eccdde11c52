"""`ttt-pipe adapt --stream ...` on a real local Ray: streams as the unit of work.

Tiny shards: 16 images, identity (severity 0) and three noises at severity 5, one file each,
so a continual run has two streams (continual-s0, continual-s5: 3 domains, 48 rows).
- continual: the order is honoured, the first domain equals iid online, the second does not
  (state carried); --reset domain equals iid online per shard;
- 1 vs 2 actors, an actor killed mid-stream, the driver interrupted and rerun: same bytes;
- mixed: every batch mixes corruptions, every (shard, sample, step) exactly once;
- correlated: longer label runs than the shards' order, the order the seed gives;
- --save-adapted: a checkpoint per stream that loads and differs from the source;
- bad --order / --reset / --dirichlet / --save-adapted: one-line errors, nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from adapt_fixtures import listing, ttt_checkpoint  # noqa: F401 (fixture)
from typer.testing import CliRunner

from jobs.adapt import KILL_ENV, AdaptRequest, run_adapt
from jobs.cli import app
from pipeline.checkpoint import build_engine_from_checkpoint, load_checkpoint
from pipeline.results import read_results
from pipeline.shards import read_shard, write_shard
from pipeline.streams import STREAM_KEY, StreamShard, label_runs, plan_streams, stream_segments

STEPS = 1
runner = CliRunner()
ORDER = "impulse_noise,gaussian_noise,shot_noise"
S5 = ("gaussian_noise-s5-00000", "impulse_noise-s5-00000", "shot_noise-s5-00000")


@pytest.fixture(scope="module")
def stream_shards(idx_dir, tmp_path_factory) -> Path:
    from pipeline.shard_maker import make_shards

    out = tmp_path_factory.mktemp("stream-shards")
    make_shards("mnist", str(out), "gaussian_noise,shot_noise,impulse_noise", "5",
                data_dir=idx_dir / "mnist", shard_size=16, limit=16, seed=0)
    return out


def _run(ckpt, shards, out, **kw):
    kw.setdefault("actors", 1)
    return run_adapt(AdaptRequest(ckpt, str(shards), str(out), steps=STEPS, **kw))


def _table(out: Path, name: str):
    return pq.read_table(Path(out) / "predictions" / f"{name}.parquet")


def _rows_of(table, shard: str):
    return table.filter(pc.equal(table.column("shard"), shard))


def _same_bytes(a: Path, b: Path) -> None:
    fa = sorted(p.name for p in (Path(a) / "predictions").glob("*.parquet"))
    assert fa == sorted(p.name for p in (Path(b) / "predictions").glob("*.parquet"))
    for name in fa:
        assert (Path(a) / "predictions" / name).read_bytes() == \
            (Path(b) / "predictions" / name).read_bytes(), name


def _close(x, y) -> bool:
    return all(np.array_equal(x.column(c).to_numpy(), y.column(c).to_numpy(), equal_nan=True)
               for c in ("sample_id", "step", "pred", "confidence", "loss"))  # batch: stream-wide


@pytest.fixture(scope="module")
def iid_online(ray_local, ttt_checkpoint, stream_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("iid") / "results"
    _run(ttt_checkpoint, stream_shards, out, mode="online")
    return out


@pytest.fixture(scope="module")
def continual(ray_local, ttt_checkpoint, stream_shards, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("continual")
    outcome = _run(ttt_checkpoint, stream_shards, root / "results", stream="continual", order=ORDER,
                   save_adapted=str(root / "adapted"))
    assert outcome.plan.settings.mode == "online"  # continual carries state unless --mode says
    return root / "results", root / "adapted"


def test_continual_honours_the_order_and_carries_state(continual, iid_online):
    out, _ = continual
    assert sorted(p.name for p in (out / "predictions").glob("*")) == \
        ["continual-s0.cost.json", "continual-s0.parquet", "continual-s5.cost.json", "continual-s5.parquet"]
    table = _table(out, "continual-s5")
    step0 = table.filter(pc.equal(table.column("step"), 0)).sort_by("position")
    assert step0.column("position").to_pylist() == list(range(48))
    assert step0.column("corruption").to_pylist() == \
        ["impulse_noise"] * 16 + ["gaussian_noise"] * 16 + ["shot_noise"] * 16
    assert set(table.column("stream").to_pylist()) == {"continual-s5"}
    first = _rows_of(table, "impulse_noise-s5-00000")
    assert _close(first, _table(iid_online, "impulse_noise-s5-00000"))
    second = _rows_of(table, "gaussian_noise-s5-00000")
    iid = _table(iid_online, "gaussian_noise-s5-00000")
    assert np.array_equal(second.column("sample_id").to_numpy(), iid.column("sample_id").to_numpy())
    assert not np.array_equal(second.column("confidence").to_numpy(), iid.column("confidence").to_numpy())
    # batches never straddle a domain: 16 rows in batches of 6 -> 3 per domain
    assert second.column("batch").to_pylist()[0] == 3

    accuracy = pq.read_table(out / "accuracy.parquet")
    assert accuracy.column_names[:2] == ["method", "stream"]
    rows = accuracy.to_pylist()
    assert {(r["stream"], r["corruption"]) for r in rows} == \
        {("continual-s0", "identity")} | {("continual-s5", c) for c in ORDER.split(",")}
    assert all(r["n"] == 16 for r in rows)
    meta = json.loads(pq.read_schema(out / "accuracy.parquet").metadata[STREAM_KEY.encode()])
    assert meta == {"stream": "continual", "order": "identity," + ORDER, "reset": "never", "dirichlet": None}
    results = read_results(str(out))
    assert results.complete and "stream" in results.predictions.column_names
    assert sorted(results.done_shards) == sorted(["identity-s0-00000", *S5])
    cost = pq.read_table(out / "cost.parquet").to_pylist()  # one row per stream
    assert [(r["shard"], r["samples"]) for r in cost] == [("continual-s0", 16), ("continual-s5", 48)]
    assert all(r["adapt_s"] > 0 and r["memory"] == "cpu_max_rss" for r in cost)


def test_save_adapted_checkpoint_loads_and_differs(continual, ttt_checkpoint):
    _, adapted = continual
    assert sorted(p.name for p in adapted.iterdir()) == ["continual-s0", "continual-s5"]
    source = build_engine_from_checkpoint(load_checkpoint(ttt_checkpoint)).state_dict()
    ckpt = load_checkpoint(str(adapted / "continual-s5"), expect_method="ttt")
    assert ckpt.manifest["training"]["adapted"]["unit"] == "continual-s5"
    state = build_engine_from_checkpoint(ckpt).state_dict()
    assert state.keys() == source.keys()
    assert any(not torch.equal(state[k], source[k]) for k in source)


def test_reset_domain_equals_iid_online_per_shard(ray_local, ttt_checkpoint, stream_shards, iid_online,
                                                  tmp_path):
    out = tmp_path / "results"
    _run(ttt_checkpoint, stream_shards, out, stream="continual", order=ORDER, reset="domain")
    table = _table(out, "continual-s5")
    for shard in S5:
        assert _close(_rows_of(table, shard),
                      _table(iid_online, shard)), shard


def test_two_actors_and_a_killed_actor_give_identical_bytes(continual, ttt_checkpoint, stream_shards,
                                                            tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_ENV, str(marker))
    out = tmp_path / "results"
    outcome = _run(ttt_checkpoint, stream_shards, out, stream="continual", order=ORDER, actors=2)
    assert "died after batch 0" in marker.read_text()
    assert outcome.timings["retried"]  # the killed stream went to another actor
    _same_bytes(continual[0], out)


def test_interrupted_stream_run_resumes_and_checks_settings(continual, ttt_checkpoint, stream_shards,
                                                            tmp_path):
    out = tmp_path / "results"
    req = AdaptRequest(ttt_checkpoint, str(stream_shards), str(out), steps=STEPS, actors=1,
                       stream="continual", order=ORDER)

    def interrupt(summary):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_adapt(req, on_shard_done=interrupt)
    assert len(list((out / "predictions").glob("*.parquet"))) == 1
    assert "accuracy.parquet" not in listing(out)
    outcome = run_adapt(req)
    assert len(outcome.shard_summaries) == 1  # the finished stream was skipped
    _same_bytes(continual[0], out)
    with pytest.raises(Exception, match="other settings.*reset 'never' vs 'domain'"):
        run_adapt(AdaptRequest(ttt_checkpoint, str(stream_shards), str(out), steps=STEPS, actors=1,
                               stream="continual", order=ORDER, reset="domain"))


def test_mixed_batches_mix_corruptions_and_every_sample_once(ray_local, ttt_checkpoint, stream_shards,
                                                             tmp_path):
    out = tmp_path / "results"  # through the CLI: the table it prints sums over streams
    result = runner.invoke(app, ["adapt", "--checkpoint", ttt_checkpoint, "--shards", str(stream_shards),
                                 "--out", str(out), "--steps", str(STEPS), "--actors", "1",
                                 "--stream", "mixed"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "mixed stream(s)" in result.output and "4 shard(s), 64 samples" in result.output
    table = _table(out, "mixed-s5")
    keys = list(zip(table.column("shard").to_pylist(), table.column("sample_id").to_pylist(),
                    table.column("step").to_pylist()))
    assert len(keys) == len(set(keys)) == 3 * 16 * (STEPS + 1)
    assert {(s, i) for s, i, _ in keys} == {(s, int(i)) for s in S5
                                            for i in read_shard(str(stream_shards / f"{s}.parquet")).sample_ids}
    step0 = table.filter(pc.equal(table.column("step"), 0))
    per_batch: dict[int, set] = {}
    for b, c in zip(step0.column("batch").to_pylist(), step0.column("corruption").to_pylist()):
        per_batch.setdefault(b, set()).add(c)
    assert len(per_batch) == 8 and all(len(c) >= 2 for c in per_batch.values())
    accuracy = pq.read_table(out / "accuracy.parquet").to_pylist()
    assert {r["corruption"] for r in accuracy if r["stream"] == "mixed-s5"} == {"gaussian_noise", "impulse_noise",
                                                                                  "shot_noise"}


def test_correlated_has_longer_label_runs_and_is_deterministic(ray_local, ttt_checkpoint, stream_shards,
                                                               tmp_path):
    """δ = 0 (Döbler's plain label sort) here: with 16 rows and 10 classes the Dirichlet split's
    balance caps every chunk at N / C = 1.6 rows, so δ > 0 barely correlates a shard this small
    (tests/pipeline/test_streams.py measures δ > 0 on 2000 labels)."""
    _run(ttt_checkpoint, stream_shards, tmp_path, stream="correlated", dirichlet=0.0)
    runs, iid_runs = [], []
    for shard in ("identity-s0-00000", *S5):
        stored = read_shard(str(stream_shards / f"{shard}.parquet"))
        unit = next(u for u in plan_streams("correlated", [StreamShard("", shard, stored.corruption,
                                                                       stored.severity, len(stored))],
                                            dirichlet=0.0))
        table = _table(tmp_path, f"correlated-{shard}")
        step0 = table.filter(pc.equal(table.column("step"), 0)).sort_by("position")
        labels = step0.column("label").to_numpy()
        assert np.all(np.diff(labels) >= 0)
        expected = stream_segments(unit, 0, lambda i: stored.labels)[0].row  # the same seed, the same order
        assert np.array_equal(step0.column("sample_id").to_numpy(), stored.sample_ids[expected])
        runs.append(label_runs(labels))
        iid_runs.append(label_runs(stored.labels))
    assert min(runs) > 1.4 * max(iid_runs), (runs, iid_runs)  # 16 rows, 10 labels: 1.6 vs 1.07


# -- bad input: one line, nothing written (validation runs before Ray starts) -----------------

BAD = [
    ("unknown order name", ["--stream", "continual", "--order", "gaussian_noise,bogus"], "bogus"),
    ("order left out", ["--stream", "continual", "--order", "gaussian_noise"], "leaves out"),
    ("order with iid", ["--order", "gaussian_noise"], "--order"),
    ("reset every:0", ["--stream", "continual", "--reset", "every:0"], "--reset"),
    ("reset word", ["--stream", "continual", "--reset", "sometimes"], "--reset"),
    ("reset domain mixed", ["--stream", "mixed", "--mode", "online", "--reset", "domain"], "no domain"),
    ("reset domain iid", ["--mode", "online", "--reset", "domain"], "holds one domain"),
    ("reset domain correlated", ["--stream", "correlated", "--mode", "online", "--reset", "domain"],
     "holds one domain"),
    ("reset episodic", ["--stream", "continual", "--mode", "episodic", "--reset", "every:2"], "--mode online"),
    ("negative dirichlet", ["--stream", "correlated", "--dirichlet", "-1"], "--dirichlet"),
    ("dirichlet iid", ["--dirichlet", "0.1"], "--dirichlet"),
    ("save-adapted episodic", ["--save-adapted", "ADAPTED"], "episodic"),
]


@pytest.mark.parametrize("what, args, message", BAD, ids=[b[0] for b in BAD])
def test_bad_stream_options_are_one_line_errors(ttt_checkpoint, stream_shards, tmp_path, what, args, message):
    args = [str(tmp_path / "adapted") if a == "ADAPTED" else a for a in args]
    result = runner.invoke(app, ["adapt", "--checkpoint", ttt_checkpoint, "--shards", str(stream_shards),
                                 "--out", str(tmp_path / "results"), *args], env={"COLUMNS": "200"})
    assert result.exit_code != 0, result.output
    assert message in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert not (tmp_path / "results").exists() and not (tmp_path / "adapted").exists()


def test_correlated_needs_labels(ttt_checkpoint, stream_shards, tmp_path):
    shard = read_shard(str(stream_shards / "shot_noise-s5-00000.parquet"))
    dst = tmp_path / "unlabelled"
    dst.mkdir()
    m = shard.metadata
    write_shard(str(dst / "shot_noise-s5-00000.parquet"), shard.sample_ids, None, shard.images,
                corruption=shard.corruption, severity=shard.severity, dataset=m["dataset"],
                mean=m["mean"], std=m["std"], seed=m["seed"], suite=m["suite"])
    result = runner.invoke(app, ["adapt", "--checkpoint", ttt_checkpoint, "--shards", str(dst),
                                 "--out", str(tmp_path / "results"), "--stream", "correlated"])
    assert result.exit_code != 0 and "unlabelled" in result.output, result.output
    assert len([x for x in result.output.splitlines() if x.startswith("error:")]) == 1
    assert not (tmp_path / "results").exists()


def test_reset_every_batch_equals_episodic(ttt_checkpoint, stream_shards, tmp_path):
    """`--reset every:1` online restores the weights and optimizer after every batch, as
    episodic mode does: same predictions, for a shard (iid) and a continual stream (no Ray)."""
    from jobs.adapt import prepare_adapt
    from jobs.shard_worker import ShardWorker

    threads = torch.get_num_threads()
    try:
        tables = {}
        for name, extra in (("episodic", dict(mode="episodic")), ("every", dict(mode="online", reset="every:1"))):
            for stream in ("iid", "continual"):
                plan = prepare_adapt(AdaptRequest(ttt_checkpoint, str(stream_shards), str(tmp_path / "r"),
                                                  steps=STEPS, stream=stream, **extra))
                worker = ShardWorker(plan.checkpoint, plan.settings, stream=plan.stream)
                unit = next(u for u in plan.units if u.name in ("impulse_noise-s5-00000", "continual-s5"))
                out = tmp_path / f"{name}-{stream}.parquet"
                worker.process(unit.shards[0].uri if stream == "iid" else unit, str(out))
                tables[name, stream] = pq.read_table(out)
        for stream in ("iid", "continual"):
            assert _close(tables["episodic", stream], tables["every", stream]), stream
        meta = pq.read_schema(tmp_path / "every-iid.parquet").metadata
        assert json.loads(meta[STREAM_KEY.encode()])["reset"] == "every:1"
        assert STREAM_KEY.encode() not in pq.read_schema(tmp_path / "episodic-iid.parquet").metadata
    finally:
        torch.set_num_threads(threads)


def test_another_stream_into_the_same_out_is_refused(continual, ttt_checkpoint, stream_shards):  # noqa: F811
    """iid after continual into one --out would predict every shard twice (the report would
    count each sample twice): one line, nothing written."""
    out, _ = continual
    before = listing(out)
    from jobs.adapt import prepare_adapt
    from pipeline.errors import TTTPipeError

    with pytest.raises(TTTPipeError, match=r"already has predictions continual-s\d for shard .*another --stream") as e:
        prepare_adapt(AdaptRequest(ttt_checkpoint, str(stream_shards), str(out), steps=STEPS, mode="online"))
    assert "\n" not in str(e.value)
    assert listing(out) == before


def test_mode_in_method_config_counts_as_chosen(ttt_checkpoint, stream_shards, tmp_path):  # noqa: F811
    """A continual stream is online unless the user chose a mode: --mode or --method-config's."""
    from jobs.adapt import prepare_adapt
    from pipeline.errors import TTTPipeError

    req = AdaptRequest(ttt_checkpoint, str(stream_shards), str(tmp_path / "r"), steps=STEPS,
                       stream="continual", method_config='{"mode": "episodic"}')
    assert prepare_adapt(req).settings.mode == "episodic"
    with pytest.raises(TTTPipeError, match="--save-adapted saves the weights"):
        prepare_adapt(AdaptRequest(ttt_checkpoint, str(stream_shards), str(tmp_path / "s"), steps=STEPS,
                                   stream="continual", method_config={"mode": "episodic"},
                                   save_adapted=str(tmp_path / "adapted")))
