"""What a method's gain is measured against: the unadapted model on the same shards.

The rule, in order:
1. A `source` series (a results folder whose method is `source`: the model, unadapted)
   whose shards are the same (`same_shards`) AND whose model is the same (`same_model`) is
   the baseline of the other series. A source run on other shards or of another model is never
   used (a note says why): e.g. `--method source,tent,ttt` compares tent with source, but ttt
   adapted its own jointly trained checkpoint, whose unadapted accuracy is another model's.
2. Otherwise an episodic `ttt` or `it3` run falls back to its own step 0: there step 0 IS the
   unadapted model on the same batch (the weights are restored after every batch, and step 0
   predicts before the first update; tests/jobs/test_adapt_worker.py
   `test_predict_shard_rows_batches_and_baseline` pins it). This holds in streams too
   (continual, correlated): episodic mode restores the weights after every batch of a stream.
   The table's caption says so.
3. Anything else is not compared. Step 0 is not the unadapted model for `norm` (it predicts
   with test-batch BN statistics at step 0 already), for online runs (step 0 of a batch follows
   the updates of every earlier batch, of the whole stream) or for CoTTA (step 0 is its EMA
   teacher's prediction, after earlier batches' updates).

"Same model" means: the same run.json `checkpoint.model_sha256` (pipeline.checkpoint
`model_sha256`: the model's own weights, without any method's auxiliary head). A run.json from
before that field (or hand-written) counts as the same model only when both record the same
`checkpoint.weights_sha256` (the very same checkpoint file); else it is not compared with the
source run (safe: a wrong baseline is worse than none).

"Same shards" means: the same shard names asked for (run.json `shards`), the same sample
count per shard (run.json `samples`, else the predictions), the same sample ids and labels in
every shard both have done (a hash of them, from the predictions), and, where both runs' shard
files are readable, the same shard metadata (dataset, corruption seed, source, ...).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import TTTPipeError
from pipeline.report.table import Series
from pipeline.results import Results, shard_name

__all__ = ["SOURCE", "STEP0_METHODS", "Baseline", "shard_fingerprints", "same_shards",
           "same_model", "choose_baselines", "run_setting", "reported_step"]

log = logging.getLogger(__name__)

SOURCE = "source"                # pipeline.checkpoint.SOURCE_METHOD: the unadapted model
STEP0_METHODS = ("ttt", "it3")   # episodic: step 0 is the unadapted model (rule 2 above)
_WHY_NOT_STEP0 = {
    "norm": "norm predicts with test-batch BN statistics already at step 0",
    "cotta": "CoTTA's step 0 is its EMA teacher's prediction, after earlier batches' updates",
}


def run_setting(run: dict, key: str, default=None):
    """`key` from run.json's `settings` (what adapt resolved), else `args`, else its top."""
    for section in (run.get("settings"), run.get("args"), run):
        if isinstance(section, dict) and section.get(key) is not None:
            return section[key]
    return default


def reported_step(s: Series) -> int:
    """The step the tables show: the run's configured number of adaptation steps (its last
    step), never the best step on test labels. Without a recorded setting: the last step found."""
    steps = run_setting(s.results.run, "steps")
    try:
        return int(steps) if steps is not None else s.last_step
    except (TypeError, ValueError):
        return s.last_step


@dataclass(frozen=True)
class Baseline:
    """`kind`: "source" (another series), "step0" (its own step 0), "self" (it is the source
    run), "none" (not compared). `why`: one sentence for the caption or a note."""

    kind: str
    why: str
    source: Series | None = None

    @property
    def compared(self) -> bool:
        return self.kind in ("source", "step0")


def shard_fingerprints(results: Results, method: str) -> dict[str, tuple[int, str]]:
    """Per done shard: (samples, sha256 of its corruption, severity, sorted sample ids and
    labels), from the predictions of `method` at its first step."""
    pred = results.predictions
    pred = pred.filter(pc.equal(pred.column("method"), method))
    if pred.num_rows == 0:
        return {}
    pred = pred.filter(pc.equal(pred.column("step"), pc.min(pred.column("step"))))
    pred = pred.select(["shard", "sample_id", "label", "corruption", "severity"]).sort_by(
        [("shard", "ascending"), ("sample_id", "ascending")])
    shards = np.asarray(pred.column("shard").to_pylist(), dtype=object)
    ids = pred.column("sample_id").to_numpy()
    labels = pc.fill_null(pred.column("label"), -1).to_numpy().astype(np.int64)
    corruption = pred.column("corruption").to_pylist()
    severity = pred.column("severity").to_pylist()
    names, starts = np.unique(shards, return_index=True)
    ends = list(starts[1:]) + [len(shards)]
    out = {}
    for name, a, b in zip(names, starts, ends):
        h = hashlib.sha256(f"{corruption[a]}:{severity[a]}:".encode())
        h.update(ids[a:b].astype("<i8").tobytes())
        h.update(labels[a:b].astype("<i8").tobytes())
        out[str(name)] = (int(b - a), h.hexdigest()[:16])
    return out


def _asked(s: Series) -> dict[str, str]:
    """Shard name -> URI the run was asked for (run.json), else the shards it has done."""
    uris = s.results.shard_uris
    return {shard_name(u): u for u in uris} if uris else {n: "" for n in s.results.done_shards}


def _few(names) -> str:
    names = sorted(names)
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _footer_meta(uri: str) -> dict | None:
    from pipeline.shards import read_shard_footer

    if not uri:
        return None
    try:
        return read_shard_footer(uri).metadata
    except (TTTPipeError, OSError, pa.ArrowException):
        return None


def same_shards(a: Series, b: Series) -> str | None:
    """None when `a` and `b` ran on the same shards; else why not (one line)."""
    asked_a, asked_b = _asked(a), _asked(b)
    if set(asked_a) != set(asked_b):
        only_a, only_b = set(asked_a) - set(asked_b), set(asked_b) - set(asked_a)
        parts = ([f"only {a.label} has {_few(only_a)}"] if only_a else []) + \
                ([f"only {b.label} has {_few(only_b)}"] if only_b else [])
        return "other shard names (" + "; ".join(parts) + ")"
    counts_a, counts_b = a.results.run.get("samples") or {}, b.results.run.get("samples") or {}
    fp_a, fp_b = _fingerprints(a), _fingerprints(b)
    differ = [n for n in asked_a if n in counts_a and n in counts_b and counts_a[n] != counts_b[n]]
    differ += [n for n in set(fp_a) & set(fp_b) if fp_a[n][0] != fp_b[n][0]]
    if differ:
        return f"other sample counts in {_few(set(differ))}"
    differ = [n for n in set(fp_a) & set(fp_b) if fp_a[n][1] != fp_b[n][1]]
    if differ:
        return f"other samples (ids or labels) in {_few(differ)}"
    for name in sorted(set(fp_a) & set(fp_b)):  # two files: do they hold the same corruption?
        if asked_a[name] and asked_b[name] and asked_a[name] != asked_b[name]:
            meta_a, meta_b = _footer_meta(asked_a[name]), _footer_meta(asked_b[name])
            if meta_a is not None and meta_b is not None and meta_a != meta_b:
                keys = sorted(k for k in set(meta_a) | set(meta_b) if meta_a.get(k) != meta_b.get(k))
                return f"shard {name} differs in its metadata ({', '.join(keys)})"
    return None


def _checkpoint_field(s: Series, key: str) -> str | None:
    ck = s.results.run.get("checkpoint")
    value = ck.get(key) if isinstance(ck, dict) else None
    return str(value) if value else None


def same_model(a: Series, b: Series) -> str | None:
    """None when `a` and `b` adapted the same unadapted network (module docstring); else why not."""
    ma, mb = _checkpoint_field(a, "model_sha256"), _checkpoint_field(b, "model_sha256")
    if ma and mb:
        return None if ma == mb else "another model (other checkpoint.model_sha256 in run.json)"
    wa, wb = _checkpoint_field(a, "weights_sha256"), _checkpoint_field(b, "weights_sha256")
    if wa and wb and wa == wb:
        return None
    return ("the same model is not known (no checkpoint.model_sha256 in run.json, and no equal "
            "checkpoint.weights_sha256); rerun adapt to record it")


def _fingerprints(s: Series) -> dict[str, tuple[int, str]]:
    return s.fingerprints if isinstance(s, _Fingerprinted) else shard_fingerprints(s.results, s.method)


class _Fingerprinted(Series):
    """A Series that computes its shard fingerprints once."""

    @cached_property
    def fingerprints(self) -> dict[str, tuple[int, str]]:
        return shard_fingerprints(self.results, self.method)


def _has_streams(s: Series) -> bool:
    acc = s.results.accuracy
    return "stream" in acc.column_names and acc.column("stream").null_count < acc.num_rows


def choose_baselines(series: list[Series]) -> tuple[dict[str, Baseline], list[str]]:
    """Series label -> its Baseline, and the notes (source runs not used, and why)."""
    series = [_Fingerprinted(s.label, s.method, s.results) for s in series]
    sources = [s for s in series if s.method == SOURCE]
    out: dict[str, Baseline] = {}
    notes: list[str] = []
    for s in series:
        if s.method == SOURCE:
            out[s.label] = Baseline("self", "the unadapted model (the baseline)")
            continue
        if sources:
            reasons = [(src, same_shards(s, src) or same_model(s, src)) for src in sources]
            match = [src for src, why in reasons if why is None]
            if match:
                out[s.label] = Baseline("source", f"vs {match[0].label} ({match[0].results.path})",
                                         match[0])
                if len(match) > 1:
                    notes.append(f"{s.label}: several source runs on its shards; compared with "
                                 f"{match[0].label} (the first given)")
                continue
            for src, why in reasons:
                notes.append(f"{s.label} not compared with {src.label}: {why}")
        mode = str(run_setting(s.results.run, "mode", "episodic"))
        which = "no source run of the same model on the same shards" if sources else "no source run"
        if s.method in STEP0_METHODS and mode == "episodic":
            where = " (in streams too: weights restored after every batch)" if _has_streams(s) else ""
            out[s.label] = Baseline("step0", f"vs its own step 0 ({which}; episodic {s.method}: "
                                             f"step 0 is the unadapted model{where})")
            continue
        why = _WHY_NOT_STEP0.get(s.method) or (
            f"{mode} mode: step 0 of a batch follows the updates of earlier batches"
            + (" of its stream" if _has_streams(s) else "")
            if mode != "episodic" else f"step 0 of {s.method} is not known to be the unadapted model")
        out[s.label] = Baseline("none", f"not compared: {which}, and {why}; add a "
                                        "'source' run of the same model on the same shards")
    return out, notes
