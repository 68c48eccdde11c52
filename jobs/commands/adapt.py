"""`ttt-pipe adapt`: adapt every shard on a pool of Ray actors, then print the accuracy table."""

from __future__ import annotations

import sys
from enum import Enum
from typing import Annotated

import typer

from jobs.commands import check_actors, command_argv
from jobs.console import cli_errors, console, err_console, progress

__all__ = ["command", "Mode", "Protocol", "accuracy_rich_table", "adapt_with_progress"]


class Mode(str, Enum):
    episodic = "episodic"
    online = "online"


class Gate(str, Enum):
    none = "none"
    entropy = "entropy"


class Protocol(str, Enum):
    batch = "batch"
    per_sample = "per-sample"


class Stream(str, Enum):
    iid = "iid"
    continual = "continual"
    mixed = "mixed"
    correlated = "correlated"


def _positive(value: float | None) -> float | None:
    if value is not None and not value > 0:
        raise typer.BadParameter(f"must be > 0, got {value}")
    return value


def accuracy_rich_table(accuracy, title: str = "Accuracy (%) before and after adaptation"):
    """corruption, severity, acc@0, acc@K, gain (K = last step), one row per method and shard kind."""
    from rich.table import Table

    from pipeline.gain import GAIN_NOISE, gain_class

    rows = accuracy.to_pylist()
    losses = 0
    last = max((r["step"] for r in rows), default=0)
    by_key: dict = {}
    for r in rows:
        by_key.setdefault((r["method"], r["corruption"], r["severity"]), {})[r["step"]] = r
    methods = sorted({k[0] for k in by_key})
    table = Table(title=title, title_justify="left")
    if len(methods) > 1:
        table.add_column("method")
    for name in ("corruption", "severity", "n", "acc@0", f"acc@{last}", "gain"):
        table.add_column(name, justify="left" if name == "corruption" else "right")
    for (method, corruption, severity), steps in sorted(by_key.items()):
        if steps[0]["accuracy"] is None or steps[last]["accuracy"] is None:  # unlabelled data
            cells = [corruption, str(severity), str(steps[0]["n"]), "no labels", "no labels", ""]
            table.add_row(*([method] if len(methods) > 1 else []), *cells)
            continue
        a0, ak = steps[0]["accuracy"] * 100, steps[last]["accuracy"] * 100
        gain = ak - a0
        kind = gain_class(gain)  # a loss beyond GAIN_NOISE points: red and marked, never missed
        text = f"{gain:+.1f}" + ("!" if kind == "loss" else "")
        style = {"loss": "bold white on red", "gain": "green"}.get(kind)
        cells = [corruption, str(severity), str(steps[0]["n"]), f"{a0:.1f}", f"{ak:.1f}",
                 f"[{style}]{text}[/]" if style else text]
        losses += kind == "loss"
        table.add_row(*([method] if len(methods) > 1 else []), *cells,
                      style="red" if kind == "loss" else None)
    if losses:
        table.caption = (f"{losses} row(s) lose more than {GAIN_NOISE:g} point(s) (! and red); "
                         "gain = last step minus step 0; ttt-pipe report compares with a source run")
    return table


def adapt_with_progress(request):
    """`jobs.adapt.run_adapt` with progress bars for shards and samples (on a terminal)."""
    from jobs.adapt import run_adapt

    with progress() as bar:
        tasks: dict = {}

        def on_plan(plan) -> None:
            done = [s for s in plan.shards if s.done]
            tasks["shards"] = bar.add_task("shards", total=len(plan.shards), completed=len(done))
            tasks["samples"] = bar.add_task("samples", total=sum(s.samples for s in plan.shards),
                                            completed=sum(s.samples for s in done))

        def on_shard_done(summary: dict) -> None:  # a stream's summary counts its shards
            bar.advance(tasks["shards"], len(summary["shards"]) if "stream" in summary else 1)
            bar.advance(tasks["samples"], summary["samples"])

        return run_adapt(request, on_plan=on_plan, on_shard_done=on_shard_done)


@cli_errors
def command(
    checkpoint: Annotated[str, typer.Option(help="Checkpoint folder of 'ttt-pipe train' (path or URI).",
                                            show_default=False)],
    shards: Annotated[str, typer.Option(help="Shards: a folder, a glob or a file (path or URI).",
                                        show_default=False)],
    out: Annotated[str, typer.Option(help="Results folder (path or URI); rerun to resume.",
                                     show_default=False)],
    steps: Annotated[int | None, typer.Option(
        min=0, help="Adaptation steps K per batch [default: the checkpoint's]", show_default=False)] = None,
    lr: Annotated[float | None, typer.Option(
        callback=_positive, help="Adaptation learning rate [default: the checkpoint's]",
        show_default=False)] = None,
    batch_size: Annotated[int | None, typer.Option(
        min=1, help="Adaptation batch size [default: the checkpoint's]", show_default=False)] = None,
    mode: Annotated[Mode | None, typer.Option(
        case_sensitive=False, help="episodic: reset after every batch; online: carry over within "
        "a shard [default: the checkpoint's]", show_default=False)] = None,
    actors: Annotated[str | None, typer.Option(
        callback=check_actors, help="Adaptation actors: N, or MIN:MAX for a pool that starts MIN (waiting "
        "for the autoscaler if their GPUs are not up) and grows to MAX as nodes join "
        "[default: as many as fit the cluster]", show_default=False)] = None,
    gate: Annotated[Gate | None, typer.Option(
        case_sensitive=False, help="entropy: keep step k's prediction of a sample only where it is "
        "less uncertain than the unadapted one (no labels used; removes most losses, "
        "benchmarks/README.md) [default: the checkpoint's, none]", show_default=False)] = None,
    episodes: Annotated[int, typer.Option(
        min=1, help="Episodes adapted at once (vmap over stacked weights; episodic mode): G "
        "batches of a shard, or G images with --protocol per-sample. Same predictions as 1 "
        "up to float rounding.")] = 1,
    protocol: Annotated[Protocol, typer.Option(
        case_sensitive=False, help="batch: each batch is an episode; per-sample: each image "
        "is adapted alone on --copies augmented copies of itself (the TTT paper's protocol; "
        "its setting: --steps 10 --lr 1e-3, SGD, rotations rand).")] = Protocol.batch,
    copies: Annotated[int, typer.Option(
        min=1, help="Augmented copies per image with --protocol per-sample (copy 0 is the "
        "image; the rest random crops and flips).")] = 32,
    gpus_per_actor: Annotated[float, typer.Option(min=0.0, help="GPUs per actor (0: CPU).")] = 0.0,
    cpus_per_actor: Annotated[float, typer.Option(
        callback=_positive, help="CPUs per actor; also its torch threads (results are bit-identical "
        "across actor counts for a fixed value).")] = 1.0,
    seed: Annotated[int, typer.Option(min=0, help="Seed for any randomness in adaptation.")] = 0,
    method: Annotated[str | None, typer.Option(
        help="Method to adapt with: ttt, it3 (their own joint checkpoint only) or source, norm, "
        "tent, eata, sar, memo, cotta, lame (any checkpoint: its model alone) [default: the "
        "checkpoint's]", show_default=False)] = None,
    method_config: Annotated[str | None, typer.Option(
        help="""JSON object of the method's config fields, e.g. '{"e_margin": 0.3}' or """
        """'{"adapt_params": "model"}' (engines/config.py, engines/<method>.py); the flags above """
        "win over it.", show_default=False)] = None,
    fisher_data: Annotated[str | None, typer.Option(
        help="eata: clean images for its Fisher penalty: 'train' (the checkpoint dataset's train "
        "split, searched in --data-dir, $TTT_PIPE_DATA, the cache) or clean shards (folder, glob, "
        "file) [default: train]", show_default=False)] = None,
    fisher_samples: Annotated[int | None, typer.Option(
        min=1, help="eata: clean images for the Fisher, a seeded subset (EATA's 2000) "
        "[default: 2000]", show_default=False)] = None,
    data_dir: Annotated[str | None, typer.Option(
        help="Folder with the dataset's files, for --fisher-data train [default: search]",
        show_default=False)] = None,
    trust_model: Annotated[str | None, typer.Option(
        help="Comma list of modules the checkpoint's model import path may come from "
        "(also $TTT_PIPE_TRUSTED_MODULES); zoo models need none.", show_default=False)] = None,
    address: Annotated[str | None, typer.Option(
        help="Ray cluster: auto, host:port, ray://host:10001, or http://head:8265 to submit a "
        "job [default: a local Ray for this command]", show_default=False)] = None,
    stream: Annotated[Stream, typer.Option(
        case_sensitive=False, help="Evaluation stream, the unit one actor runs start to end: iid "
        "(each shard alone), continual (one stream per severity, its corruptions in --order, "
        "state carried; online unless --mode), mixed (all corruptions of a severity shuffled "
        "together), correlated (each shard label-sorted, Dirichlet --dirichlet).")] = Stream.iid,
    order: Annotated[str | None, typer.Option(
        help="continual: comma list of corruptions in stream order [default: the suite's "
        "standard order, ImageNet-C's for RGB]", show_default=False)] = None,
    reset: Annotated[str | None, typer.Option(
        help="When the engine is reset inside a stream (online): never, domain (at each domain "
        "boundary of a continual stream) or every:N (batches) [default: never; every stream "
        "starts fresh]", show_default=False)] = None,
    dirichlet: Annotated[float | None, typer.Option(
        min=0.0, help="Label-correlated order with Dirichlet concentration δ (small: long runs "
        "of a class; 0: sorted by label) for correlated [default 0.1], continual (per domain) or "
        "mixed; needs labels.", show_default=False)] = None,
    save_adapted: Annotated[str | None, typer.Option(
        help="Folder: the weights each online stream ends with, one checkpoint per stream "
        "(DIR/<stream>/).", show_default=False)] = None,
) -> None:
    """Adapt every shard with a test-time method (--method) on a pool of Ray actors; write per-sample predictions
    (every step 0..K; step 0 is the unadapted baseline) and accuracy.parquet to OUT."""
    from jobs.adapt import AdaptRequest
    from jobs.cluster import is_job_address, submit_job

    if is_job_address(address):
        argv = command_argv("adapt", checkpoint=checkpoint, shards=shards, out=out, steps=steps, lr=lr,
                         batch_size=batch_size, mode=mode, actors=actors,
                         gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, seed=seed,
                         method=method, trust_model=trust_model,
                         episodes=episodes, protocol=protocol, copies=copies, gate=gate,
                         method_config=method_config, fisher_data=fisher_data,
                         fisher_samples=fisher_samples, data_dir=data_dir,
                         stream=stream, order=order, reset=reset, dirichlet=dirichlet,
                         save_adapted=save_adapted)
        raise typer.Exit(code=submit_job(address, argv, out=sys.stdout))
    request = AdaptRequest(checkpoint=checkpoint, shards=shards, out=out, steps=steps, lr=lr,
                           batch_size=batch_size, mode=mode.value if mode else None, actors=actors,
                           gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, seed=seed,
                           address=address, method=method, trust_model=trust_model,
                           episodes=episodes, protocol=protocol.value, copies=copies,
                           gate=gate.value if gate else None, method_config=method_config,
                           fisher_data=fisher_data, fisher_samples=fisher_samples,
                           data_dir=data_dir, stream=stream.value, order=order,
                           reset=reset, dirichlet=dirichlet, save_adapted=save_adapted)
    outcome = adapt_with_progress(request)
    plan = outcome.plan
    skipped = sum(1 for x in plan.shards if x.done)
    s = plan.settings
    console.print(accuracy_rich_table(
        outcome.accuracy, title=f"{s.method}: accuracy (%) before and after {s.steps} step(s), "
        f"lr {s.lr:g}, batch {s.batch_size}, {s.mode}"
        f"{f', per-sample x{s.copies}' if s.protocol == 'per-sample' else ''}"
        f"{f', {plan.stream.stream} stream(s)' if plan.stream.stream != 'iid' else ''}"))
    pool = (f", {outcome.timings.get('actors_ready', outcome.pool.actors)} actor(s)"
            if outcome.pool else "")
    err_console.print(
        f"{len(plan.shards)} shard(s), {sum(x.samples for x in plan.shards)} samples"
        f"{f' ({skipped} already done)' if skipped else ''}{pool}; results in {out}",
        highlight=False, soft_wrap=True)
