"""pipeline.streams without Ray or files: stream plans, row orders, the Dirichlet sampler."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import TTTPipeError
from pipeline.streams import (IMAGENET_C_ORDER, STREAM_KEY, StreamSettings, StreamShard, dirichlet_order,
                              label_runs, parse_reset, plan_streams, resolve_order, stream_segments,
                              suite_order)


def _shards(corruptions=("gaussian_noise", "shot_noise", "fog"), severity=5, rows=(7, 5, 9), files=1):
    out = []
    for c, n in zip(corruptions, rows):
        for f in range(files):
            out.append(StreamShard(f"/s/{c}-s{severity}-{f:05d}.parquet", f"{c}-s{severity}-{f:05d}",
                                   c, severity, n))
    return out


def _pairs(segments, unit):
    return [(unit.shards[s].name, int(r)) for seg in segments for s, r in zip(seg.shard_index, seg.row)]


def test_parse_reset():
    assert str(parse_reset(None)) == "never" and str(parse_reset("domain")) == "domain"
    assert parse_reset("every:3").every == 3
    for bad in ("every:0", "every:x", "sometimes", "every:", "every:-1"):
        with pytest.raises(TTTPipeError, match="--reset"):
            parse_reset(bad)


def test_default_orders_and_order_errors(caplog):
    assert suite_order("imagenet-c", ["fog", "gaussian_noise", "snow"]) == ["gaussian_noise", "snow", "fog"]
    assert IMAGENET_C_ORDER[:3] == ("gaussian_noise", "shot_noise", "impulse_noise")
    assert suite_order("mnist-c", ["zigzag", "gaussian_noise", "identity"]) == ["identity", "gaussian_noise", "zigzag"]
    known = ["gaussian_noise", "shot_noise", "fog", "snow"]
    with caplog.at_level("INFO"):
        assert resolve_order("fog,snow,gaussian_noise", "imagenet-c", ["fog", "gaussian_noise"], known) == \
            ["fog", "gaussian_noise"]
    assert "snow" in caplog.text  # absent: skipped with a log line
    with pytest.raises(TTTPipeError, match="unknown corruption.*bogus"):
        resolve_order("fog,bogus", "imagenet-c", ["fog"], known)
    with pytest.raises(TTTPipeError, match="leaves out gaussian_noise"):
        resolve_order("fog", "imagenet-c", ["fog", "gaussian_noise"], known)
    with pytest.raises(TTTPipeError, match="repeats fog"):
        resolve_order("fog,fog", "imagenet-c", ["fog"], known)


def test_plans_name_units_and_group_by_severity():
    shards = _shards() + _shards(("gaussian_noise",), severity=3, rows=(4,))
    iid = plan_streams("iid", shards)
    assert [u.name for u in iid] == sorted(s.name for s in shards)  # today's file names
    cont = plan_streams("continual", shards, ["fog", "gaussian_noise", "shot_noise"])
    assert [u.name for u in cont] == ["continual-s3", "continual-s5"]
    assert cont[1].domains == ("fog", "gaussian_noise", "shot_noise")
    assert [u.name for u in plan_streams("correlated", shards, dirichlet=0.1)][0].startswith("correlated-")


def test_continual_segments_follow_the_order_and_cover_every_row_once():
    unit = plan_streams("continual", _shards(files=2), ["fog", "shot_noise", "gaussian_noise"])[0]
    segments = stream_segments(unit, seed=0)
    assert [unit.shards[int(seg.shard_index[0])].corruption for seg in segments] == \
        ["fog", "shot_noise", "gaussian_noise"]
    assert [len(seg) for seg in segments] == [18, 10, 14]  # a domain spans its two files
    pairs = _pairs(segments, unit)
    assert len(pairs) == len(set(pairs)) == unit.samples
    assert pairs[:9] == [("fog-s5-00000", r) for r in range(9)]  # stored order, files in name order


def test_mixed_is_a_seeded_permutation_across_domains():
    unit = plan_streams("mixed", _shards())[0]
    a, b = stream_segments(unit, seed=0), stream_segments(unit, seed=0)
    assert len(a) == 1 and _pairs(a, unit) == _pairs(b, unit)
    assert _pairs(a, unit) != _pairs(stream_segments(unit, seed=1), unit)
    pairs = _pairs(a, unit)
    assert sorted(pairs) == sorted((s.name, r) for s in unit.shards for r in range(s.rows))
    first = {unit.shards[int(i)].corruption for i in a[0].shard_index[:6]}
    assert len(first) > 1


def test_dirichlet_order_runs_longer_deterministic_and_a_permutation():
    labels = np.random.default_rng(0).integers(0, 10, 2000)
    iid = label_runs(labels)
    orders = {}
    for delta in (0.01, 0.1, 1.0):
        p = dirichlet_order(labels, delta, np.random.default_rng(5))
        assert sorted(p.tolist()) == list(range(len(labels)))
        assert np.array_equal(p, dirichlet_order(labels, delta, np.random.default_rng(5)))
        orders[delta] = label_runs(labels[p])
    assert orders[0.01] > orders[0.1] > orders[1.0] > 5 * iid  # smaller δ: longer runs
    sorted_p = dirichlet_order(labels, 0.0, np.random.default_rng(5))
    assert np.all(np.diff(labels[sorted_p]) >= 0)  # δ = 0: sorted by label (Döbler)
    assert not np.array_equal(dirichlet_order(labels, 0.1, np.random.default_rng(6)),
                              dirichlet_order(labels, 0.1, np.random.default_rng(5)))


def test_correlated_segments_need_labels_and_depend_on_the_seed():
    unit = next(u for u in plan_streams("correlated", _shards(rows=(40, 5, 9)), dirichlet=0.1)
                if u.shards[0].corruption == "gaussian_noise")
    labels = np.arange(40) % 10
    with pytest.raises(TTTPipeError, match="needs labels"):
        stream_segments(unit, 0)
    a = stream_segments(unit, 0, lambda i: labels)
    assert label_runs(labels[a[0].row]) > label_runs(labels)
    assert np.array_equal(a[0].row, stream_segments(unit, 0, lambda i: labels)[0].row)
    assert not np.array_equal(a[0].row, stream_segments(unit, 1, lambda i: labels)[0].row)


def test_stream_settings_metadata_is_empty_for_iid():
    assert StreamSettings().metadata() == {}
    s = StreamSettings(stream="continual", order="a,b", reset="domain")
    meta = s.metadata()
    assert StreamSettings.from_metadata(meta) == s and StreamSettings.from_metadata({}) == StreamSettings()
    assert STREAM_KEY in meta and s.diff(StreamSettings()) != []
