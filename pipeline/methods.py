"""Which method adapts a checkpoint (`ttt-pipe adapt --method M`) and how its engine is built.

A checkpoint holds a model and, for the methods that need joint training (`ttt`, `it3`), that
method's auxiliary part. Every other registered method (`source`, `norm`, `tent`, `eata`,
`sar`, `memo`, `cotta`, `lame`: `needs_joint_training` False) adapts ANY checkpoint: its engine
is built around the checkpoint's model alone (a `source` checkpoint, an imported one, or the
`model.` part of a ttt/it3 checkpoint). The joint methods adapt only their own checkpoint.

The method's config: the checkpoint's stored one when M is the checkpoint's method, else M's
config class defaults (engines/config.py, engines/<m>.py), then `--method-config` on top
(validated by the config class: an unknown key is a one-line error listing the valid ones).

EATA's Fisher regulariser (engines/eata.py) is computed in each actor from clean images:
by default `FISHER_SAMPLES` = 2000 images of the checkpoint's dataset's TRAIN split — the
official EATA code's `--fisher_size 2000` (github.com/mr-eggplant/EATA main.py, the Fisher
"calculated on 2,000 samples" of the ImageNet training set, Niu et al. ICML 2022, Sec. 5
implementation details) — drawn as a seeded subset (deterministic), in batches of the
adaptation batch size (the official `fisher_loader` uses the test batch size). `--fisher-data`
names another source: `train` or clean shards (a folder, glob or file of `ttt-pipe corrupt`
output, e.g. `--corruptions identity`). No Ray here: the driver validates, the actor builds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.errors import TTTPipeError
from pipeline.json_option import parse_json_object

__all__ = ["FISHER_SAMPLES", "FISHER_TRAIN", "MethodChoice", "checkpoint_agnostic_methods", "parse_method_config", "resolve_method",
           "build_method_engine", "check_method_engine", "FisherSource", "resolve_fisher", "fisher_images",
           "attach_fisher"]

log = logging.getLogger(__name__)

FISHER_SAMPLES = 2000  # official EATA --fisher_size (see the module docstring)
FISHER_TRAIN = "train"  # --fisher-data: the checkpoint dataset's train split
# Fields of a joint method's config that shape its trained part (the head, embedder, where it
# attaches): changing them at test time would not fit the checkpoint's weights.
_TRAINED_FIELDS = ("layer", "aux_weight", "seed", "train_epochs", "train_batch_size", "train_lr",
                   "embedder", "null")


@dataclass(frozen=True)
class MethodChoice:
    """The method to adapt with, its resolved config (`to_dict()` form) and what it came from."""

    name: str
    config: dict[str, Any]
    overrides: dict[str, Any]     # --method-config as given (stored with the predictions)
    own_checkpoint: bool          # M is the checkpoint's method: its stored config is the base
    needs_joint_training: bool


def parse_method_config(value: str | dict | None) -> dict[str, Any]:
    """`--method-config` JSON (or a dict) -> a dict; one-line error when it is not an object."""
    return parse_json_object(value, "--method-config", '{"e_margin": 0.4}')


def _engine_cls(name: str):
    import engines

    try:
        return engines.get_engine(name)
    except (KeyError, ValueError) as exc:
        raise TTTPipeError(exc.args[0] if exc.args else str(exc)) from None


def checkpoint_agnostic_methods() -> list[str]:
    """The registered methods that adapt any checkpoint (`needs_joint_training` False)."""
    import engines

    return [n for n in engines.list_engines() if not engines.get_engine(n).needs_joint_training]


def _joint_message(ckpt, name: str) -> str:
    return (f"{name} adapts only a checkpoint trained jointly with its auxiliary part, and "
            f"{ckpt.uri} is a {ckpt.method!r} checkpoint; make one with ttt-pipe train "
            f"--method {name} --dataset DATASET --out DIR (or adapt this one with a method "
            f"that needs no joint training: {', '.join(checkpoint_agnostic_methods())})")


def resolve_method(ckpt, method: str | None = None, method_config: str | dict | None = None
                   ) -> MethodChoice:
    """The method `ckpt` is adapted with (default: its own) and its config; one-line errors for
    an unknown method, a joint method on another checkpoint, a bad `--method-config`."""
    name = method or ckpt.method
    cls = _engine_cls(name)
    own = name == ckpt.method
    if cls.needs_joint_training and not own:
        raise TTTPipeError(_joint_message(ckpt, name))
    overrides = parse_method_config(method_config)
    if cls.needs_joint_training:
        fixed = sorted(set(overrides) & set(_TRAINED_FIELDS))
        if fixed:
            raise TTTPipeError(f"--method-config cannot change {', '.join(fixed)} of {name}: they "
                               f"shape its trained part; retrain with ttt-pipe train --method {name}")
    base = dict(ckpt.manifest["method"].get("config") or {}) if own else {}
    try:
        config = cls.config_cls.from_dict({**base, **overrides})
    except (TypeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        where = "--method-config" if overrides else f"checkpoint {ckpt.uri}'s method config"
        raise TTTPipeError(f"{where} for {name}: {first}") from None
    return MethodChoice(name=name, config=config.to_dict(), overrides=overrides, own_checkpoint=own,
                        needs_joint_training=cls.needs_joint_training)


def build_method_engine(ckpt, name: str, config: dict[str, Any], device: str | torch.device = "cpu",
                        trusted=None) -> torch.nn.Module:
    """Method `name`'s engine with `config` for checkpoint `ckpt`, on `device`.

    A joint method (its own checkpoint, `resolve_method` checked) loads the whole engine's
    weights; any other method wraps the checkpoint's model alone (its own state, e.g. CoTTA's
    teacher or EATA's moving average, starts as the engine initialises it).
    """
    import engines
    from pipeline.checkpoint import (_load_strict, build_model_from_checkpoint,
                                     checkpoint_image_shape)
    from pipeline.model_spec import build_model_from_spec, make_engine

    cls = _engine_cls(name)
    cfg = engines.config_from_dict(name, config)
    example = torch.zeros(1, *checkpoint_image_shape(ckpt))
    model_name = ckpt.manifest["model"]["name"]
    if cls.needs_joint_training:
        if name != ckpt.method:
            raise TTTPipeError(_joint_message(ckpt, name))
        model = build_model_from_spec(ckpt.manifest["model"], trusted, origin=ckpt.uri)
        engine = make_engine(name, model, example, cfg, model_name)
        _load_strict(engine, ckpt.state_dict, ckpt, f"model {model_name!r} with method {name!r}")
        return engine.to(device)
    model = build_model_from_checkpoint(ckpt, "cpu", trusted)
    return make_engine(name, model, example, cfg, model_name).to(device)


def check_method_engine(ckpt, choice: MethodChoice, trusted=None) -> None:
    """Build the engine once on the CPU and drop it, so what the actors would hit (a model
    without norm layers for adapt_params "norm", a forward LAME's features do not fit) is one
    line in the driver. Joint methods are skipped: their engine was built when training."""
    if not choice.needs_joint_training:
        build_method_engine(ckpt, choice.name, choice.config, "cpu", trusted)


# -- EATA's Fisher information ----------------------------------------------------------------
@dataclass(frozen=True)
class FisherSource:
    """Where an actor reads the clean images for EATA's Fisher: `data` "" (none), "train" or a
    shard spec (absolute); `samples` how many (a seeded subset); `data_dir` for "train"."""

    data: str = ""
    samples: int = 0
    data_dir: str | None = None


def _wants_fisher(choice: MethodChoice) -> bool:
    return choice.name == "eata" and float(choice.config.get("fisher_alpha", 0.0)) > 0


def resolve_fisher(choice: MethodChoice, ckpt, fisher_data: str | None, fisher_samples: int | None,
                   data_dir: str | None = None) -> FisherSource:
    """Check the Fisher data in the driver (before any Ray work): the checkpoint dataset's train
    split can be found (the usual search: `data_dir`, $TTT_PIPE_DATA, the cache), or the shards'
    footers fit the checkpoint. Not EATA (or fisher_alpha 0): nothing, and the options refused."""
    if not _wants_fisher(choice):
        if fisher_data is not None or fisher_samples is not None:
            why = "eata only" if choice.name != "eata" else "eata with fisher_alpha > 0"
            raise TTTPipeError(f"--fisher-data and --fisher-samples apply to {why}; drop them")
        return FisherSource()
    samples = FISHER_SAMPLES if fisher_samples is None else fisher_samples
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise TTTPipeError(f"--fisher-samples must be an integer >= 1, got {samples!r} (EATA "
                           """without its Fisher penalty: --method-config '{"fisher_alpha": 0}')""")
    data = fisher_data or FISHER_TRAIN
    if data == FISHER_TRAIN:
        _check_train_split(ckpt, data_dir)
        return FisherSource(data=FISHER_TRAIN, samples=samples, data_dir=data_dir)
    from pipeline.checkpoint import checkpoint_image_shape
    from pipeline.shards import list_shards, read_shard_footer

    shape = checkpoint_image_shape(ckpt)
    for uri in list_shards(data):
        footer = read_shard_footer(uri)
        if footer.dataset != ckpt.dataset or footer.image_shape != shape:
            raise TTTPipeError(f"--fisher-data shard {uri} holds {footer.dataset!r} images of "
                               f"shape {footer.image_shape}, the checkpoint {ckpt.dataset!r} of "
                               f"shape {shape}; pass clean shards of the checkpoint's data")
    return FisherSource(data=data, samples=samples)


def _train_spec(ckpt):
    """The DatasetSpec of the checkpoint's data, or a one-line error saying how to give shards."""
    from pipeline.checkpoint import checkpoint_image_shape
    from pipeline.datasets import get_dataset

    shape = checkpoint_image_shape(ckpt)
    try:
        return get_dataset(ckpt.dataset, shape[1] if ckpt.dataset == "imagenet" else None)
    except TTTPipeError:
        raise TTTPipeError(
            f"EATA's Fisher needs clean images of {ckpt.dataset!r}, which is not a dataset name "
            "ttt-pipe can find; pass --fisher-data with clean shards of it (ttt-pipe corrupt "
            "--corruptions identity ...)") from None


def _check_train_split(ckpt, data_dir: str | None) -> None:
    """The train split's files can be found (IDX/CIFAR: located, not read; image folders:
    listed, not decoded): the driver never loads the images."""
    from pipeline.datasets import _module as dataset_module
    from pipeline.datasets import folder

    spec = _train_spec(ckpt)
    module = dataset_module(spec)
    try:
        if module is folder:
            n = folder.split_length(spec, "train", data_dir)
        else:
            module.find_data_dir(spec.name, data_dir)
            n = 1
    except TTTPipeError as exc:
        raise TTTPipeError(f"EATA's Fisher reads clean {spec.name} train images: {exc} (or pass "
                           "--fisher-data SHARDS)") from None
    if n == 0:
        raise TTTPipeError(f"the {spec.name} train split is empty; EATA's Fisher needs clean "
                           "images: pass --data-dir or --fisher-data SHARDS")


def _subset(n: int, samples: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset of `samples` of range(n) (all of them when n <= samples)."""
    if n <= samples:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=samples, replace=False))


def fisher_images(source: FisherSource, ckpt, seed: int = 0) -> np.ndarray:
    """float32 pixel-unit images (N, C, H, W) for EATA's Fisher: a seeded subset of the train
    split or of the shards' rows (in file order). Same source, samples, seed: same images."""
    from pipeline.datasets.base import to_float

    if source.data == FISHER_TRAIN:
        spec = _train_spec(ckpt)
        from pipeline.datasets import folder, load_split
        from pipeline.datasets import _module as dataset_module

        if dataset_module(spec) is folder:  # decode only the chosen files
            _, paths, _ = folder.split_samples(spec, "train", source.data_dir)
            rows = _subset(len(paths), source.samples, seed)
            size = spec.image_shape[1]
            return to_float(np.stack([folder.decode_image(paths[i], size) for i in rows]))
        split = load_split(spec, "train", data_dir=source.data_dir)
        return to_float(split.images[_subset(len(split), source.samples, seed)])
    from pipeline.shards import list_shards, read_shard

    images = np.concatenate([read_shard(uri).pixels() for uri in list_shards(source.data)])
    return images[_subset(len(images), source.samples, seed)]


def attach_fisher(engine, source: FisherSource, ckpt, seed: int, batch_size: int) -> int:
    """Compute EATA's Fisher on `engine` (engines/eata.py `compute_fisher`) from `source`'s
    images in batches of `batch_size`; returns the image count (0: nothing to do)."""
    if not source.data:
        return 0
    images = torch.from_numpy(fisher_images(source, ckpt, seed))
    device = next(engine.parameters()).device
    batches = (images[i:i + batch_size].to(device) for i in range(0, len(images), batch_size))
    engine.compute_fisher(batches)
    log.info("EATA Fisher from %d clean image(s) of %s", len(images), source.data)
    return len(images)
