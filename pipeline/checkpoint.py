"""The joint checkpoint: a directory with `weights.pt` (the engine's state_dict) and `manifest.json`.

The manifest says how to rebuild the engine (the model spec: a zoo name or an import path, its
kwargs and normalisation, pipeline/model_spec.py; method name and config; dataset), how it was trained (epochs, batch size, lr, seed, limit, per-epoch
metrics, seconds) and the sha256 of `weights.pt`, so a checkpoint is checked before it is
unpickled and loaded with `torch.load(weights_only=True)` (tensors only, never arbitrary pickle).

A `source` checkpoint (method name "source", written by `ttt-pipe import-model`) holds a model
alone: `weights.pt` is the model's own state_dict and no method part exists yet. Its model can be
built (`build_model_from_checkpoint`), but no engine: a method's auxiliary part must be trained
on it first. A model given by import path is built only when its module is trusted.

Writes are atomic. Local paths: both files go into a hidden temporary sibling directory that is
renamed into place, so the directory either exists complete or not at all. Object stores
(`s3://...`) have no directory rename: `weights.pt` is written first and `manifest.json` last,
and the manifest (with the weights' sha256) is what marks a checkpoint complete.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pyarrow import fs as pafs

from pipeline import storage
from pipeline.errors import TTTPipeError

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "WEIGHTS_NAME",
    "Checkpoint",
    "model_sha256",
    "save_checkpoint",
    "load_checkpoint",
    "SOURCE_METHOD",
    "build_engine_from_checkpoint",
    "checkpoint_image_shape",
    "build_model_from_checkpoint",
    "check_adaptable",
    "dataset_entry",
    "model_state_dict",
]

FORMAT_VERSION = 1
WEIGHTS_NAME = "weights.pt"
MANIFEST_NAME = "manifest.json"
_REQUIRED = ("format_version", "model", "method", "dataset", "weights_sha256")
SOURCE_METHOD = "source"  # a model without any method's auxiliary part (import-model)


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: its manifest and the engine's state_dict (tensors on map_location)."""

    uri: str
    manifest: dict[str, Any]
    state_dict: dict[str, torch.Tensor]

    @property
    def method(self) -> str:
        return self.manifest["method"]["name"]

    @property
    def model_name(self) -> str:
        return self.manifest["model"]["name"]

    @property
    def dataset(self) -> str:
        return self.manifest["dataset"]["name"]


def checkpoint_image_shape(ckpt: Checkpoint) -> tuple[int, int, int]:
    """The (C, H, W) the checkpoint's model takes: the manifest's ``dataset.image_shape``;
    manifests written before that key existed are of a registered dataset, whose spec says."""
    shape = ckpt.manifest["dataset"].get("image_shape")
    if shape is None:
        from pipeline.datasets import get_dataset

        try:
            shape = get_dataset(ckpt.dataset).image_shape
        except TTTPipeError:
            raise TTTPipeError(f"checkpoint {ckpt.uri} has no dataset.image_shape in its manifest "
                               f"and {ckpt.dataset!r} is not a known dataset; retrain it") from None
    if (not isinstance(shape, (list, tuple)) or len(shape) != 3
            or not all(isinstance(v, int) and v > 0 for v in shape)):
        raise TTTPipeError(f"checkpoint {ckpt.uri} has an invalid dataset.image_shape {shape!r}; "
                           "retrain it")
    return tuple(int(v) for v in shape)


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _state_dict_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    # Contiguous CPU copies: the bytes (and their sha) do not depend on the training device.
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    buf = io.BytesIO()
    torch.save(cpu, buf)
    return buf.getvalue()


def save_checkpoint(uri: str, engine_state_dict: dict[str, torch.Tensor],
                    manifest: dict[str, Any]) -> dict[str, Any]:
    """Write a checkpoint directory at `uri` atomically; return the manifest as written.

    `manifest` holds `model`, `method`, `dataset` and `training` (docs/contracts.md); this adds
    `format_version`, `weights_sha256` and `created`. An existing checkpoint at `uri` is
    replaced; an existing directory that is not a checkpoint is refused.
    """
    for key in ("model", "method", "dataset"):
        if key not in manifest:
            raise TTTPipeError(f"checkpoint manifest lacks {key!r}; pass model, method, dataset and training")
    weights = _state_dict_bytes(engine_state_dict)
    full = {
        "format_version": FORMAT_VERSION,
        **{k: v for k, v in manifest.items() if k not in ("format_version", "weights_sha256", "created")},
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "created": _utc_now(),
    }
    manifest_bytes = (json.dumps(full, indent=2) + "\n").encode()
    fs, path = storage.resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        _save_local(Path(path), weights, manifest_bytes)
    else:
        storage.atomic_write_bytes(weights, storage.join(uri, WEIGHTS_NAME))
        storage.atomic_write_bytes(manifest_bytes, storage.join(uri, MANIFEST_NAME))  # last: marks done
    return full


def _save_local(target: Path, weights: bytes, manifest_bytes: bytes) -> None:
    if target.exists() and not target.is_dir():
        raise TTTPipeError(f"checkpoint path {target} is a file; choose a directory path for --out")
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST_NAME).exists():
        raise TTTPipeError(
            f"refusing to overwrite {target}: it is a non-empty directory but not a checkpoint; "
            "choose another --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    old = target.parent / f".{target.name}.old-{tag}"
    try:
        tmp.mkdir()
        for name, data in ((WEIGHTS_NAME, weights), (MANIFEST_NAME, manifest_bytes)):
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if target.exists():
            os.replace(target, old)  # a directory cannot be renamed onto a non-empty one
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _read(uri: str, what: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except TTTPipeError:
        raise
    except (FileNotFoundError, OSError) as exc:
        raise TTTPipeError(f"cannot read {what} {uri}: {exc}".splitlines()[0]) from None


def load_checkpoint(uri: str, expect_method: str | None = None, map_location: str | torch.device = "cpu",
                    expect_dataset: str | None = None) -> Checkpoint:
    """Read and verify the checkpoint at `uri`.

    Raises a one-line `TTTPipeError` when it is missing, truncated or tampered with (sha256 of
    `weights.pt` differs from the manifest), of an unknown format version, or trained for
    another method (`expect_method`) or dataset (`expect_dataset`) than asked.
    """
    manifest_uri = storage.join(uri, MANIFEST_NAME)
    weights_uri = storage.join(uri, WEIGHTS_NAME)
    hint = "train one with `ttt-pipe train --out ...`"
    if not storage.exists(manifest_uri):
        if storage.exists(weights_uri):
            raise TTTPipeError(f"checkpoint {uri} has no {MANIFEST_NAME} (incomplete write?); retrain it")
        raise TTTPipeError(f"no checkpoint at {uri} ({MANIFEST_NAME} not found); {hint}")
    try:
        manifest = json.loads(_read(manifest_uri, "checkpoint manifest"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TTTPipeError(f"checkpoint manifest {manifest_uri} is not valid JSON (truncated?); retrain it") from None
    if not isinstance(manifest, dict) or any(k not in manifest for k in _REQUIRED):
        raise TTTPipeError(f"checkpoint manifest {manifest_uri} lacks one of {', '.join(_REQUIRED)}; retrain it")
    version = manifest["format_version"]
    if version != FORMAT_VERSION:
        raise TTTPipeError(
            f"checkpoint {uri} has format_version {version!r}; this ttt-pipe reads {FORMAT_VERSION}: "
            "retrain it or use a matching ttt-pipe")
    method = manifest["method"].get("name")
    if expect_method is not None and method == SOURCE_METHOD and expect_method != SOURCE_METHOD:
        raise TTTPipeError(_source_message(uri, expect_method))
    if expect_method is not None and method != expect_method:
        raise TTTPipeError(
            f"checkpoint {uri} was trained for method {method!r}, not {expect_method!r}; "
            f"pass --method {method} or train with --method {expect_method}")
    dataset = manifest["dataset"].get("name")
    if expect_dataset is not None and dataset != expect_dataset:
        raise TTTPipeError(
            f"checkpoint {uri} was trained on {dataset!r}, not {expect_dataset!r}; "
            "use shards and checkpoint of the same dataset")
    if not storage.exists(weights_uri):
        raise TTTPipeError(f"checkpoint {uri} has no {WEIGHTS_NAME}; retrain it")
    weights = _read(weights_uri, "checkpoint weights")
    if hashlib.sha256(weights).hexdigest() != manifest["weights_sha256"]:
        raise TTTPipeError(
            f"checkpoint weights {weights_uri} do not match the manifest's sha256 "
            "(truncated or modified); retrain it")
    try:
        state_dict = torch.load(io.BytesIO(weights), map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling errors have many types; the sha already matched
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TTTPipeError(f"cannot load checkpoint weights {weights_uri}: {first}") from None
    if not isinstance(state_dict, dict):
        raise TTTPipeError(f"checkpoint weights {weights_uri} are not a state_dict; retrain it")
    return Checkpoint(uri=uri, manifest=manifest, state_dict=state_dict)


def _source_message(uri: str, method: str | None) -> str:
    m = method or "ttt|it3"
    return (f"checkpoint {uri} is a source model (imported, no auxiliary part); train {m}'s part on "
            f"it first: ttt-pipe train --method {m} --init {uri} --train aux")


def dataset_entry(spec) -> dict[str, Any]:
    """The manifest's `dataset` entry for a DatasetSpec: name (its identity), mean, std (a float
    when one channel, else a list), num_classes, image_shape."""
    def plain(v):
        v = list(v) if isinstance(v, (tuple, list)) else [v]
        return float(v[0]) if len(v) == 1 else [float(x) for x in v]

    return {"name": spec.name, "mean": plain(spec.mean), "std": plain(spec.std),
            "num_classes": int(spec.num_classes), "image_shape": [int(v) for v in spec.image_shape]}


def check_adaptable(ckpt: Checkpoint, trusted=None, method: str | None = None) -> None:
    """Fail now, in one line, if adaptation actors could not build `ckpt`'s engine: a source
    checkpoint (no method part) without a `method` that needs no joint training
    (pipeline/methods.py), or a model import path whose module is not trusted."""
    from pipeline.model_spec import check_trusted, is_import_path

    if ckpt.method == SOURCE_METHOD and (method is None or _needs_joint_training(method)):
        raise TTTPipeError(_source_message(ckpt.uri, method))
    name = ckpt.manifest["model"].get("name", "")
    if is_import_path(name):
        check_trusted(name, trusted, ckpt.uri)


def _needs_joint_training(method: str) -> bool:
    import engines

    try:
        return engines.get_engine(method).needs_joint_training
    except ValueError as exc:
        raise TTTPipeError(exc.args[0]) from None


def model_state_dict(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The model's own weights: all of a source checkpoint, the `model.` part of an engine's."""
    if ckpt.method == SOURCE_METHOD:
        return dict(ckpt.state_dict)
    return {k[len("model."):]: v for k, v in ckpt.state_dict.items() if k.startswith("model.")}


def model_sha256(ckpt: Checkpoint) -> str:
    """sha256 of the model's own weights (`model_state_dict`: no method's auxiliary head), keys
    sorted, each as name, dtype, shape and contiguous CPU bytes. Two checkpoints with the same
    value hold the same unadapted network: a joint checkpoint built on a source model without
    retraining it matches that source; a jointly trained one does not."""
    h = hashlib.sha256()
    for key, tensor in sorted(model_state_dict(ckpt).items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _load_strict(module, state_dict, ckpt: Checkpoint, what: str) -> None:
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise TTTPipeError(f"checkpoint {ckpt.uri} does not fit {what}: {first}; retrain it") from None


def build_model_from_checkpoint(ckpt: Checkpoint, device: str | torch.device = "cpu", trusted=None):
    """The checkpoint's model (zoo or trusted import path) with its weights, on `device`."""
    from pipeline.model_spec import build_model_from_spec

    model = build_model_from_spec(ckpt.manifest["model"], trusted, origin=ckpt.uri)
    _load_strict(model, model_state_dict(ckpt), ckpt, f"model {ckpt.model_name!r}")
    return model.to(device)


def build_engine_from_checkpoint(ckpt: Checkpoint, device: str | torch.device = "cpu", trusted=None):
    """Rebuild the model and the method's engine from `ckpt.manifest`, load the weights.

    Returns the engine (an `nn.Module`) on `device`, in the mode it was built in. A model given
    by import path needs its module trusted (`trusted` + $TTT_PIPE_TRUSTED_MODULES); a source
    checkpoint has no engine (one-line error saying how to train its method part).
    """
    import engines  # pipeline may import engines; engines never import pipeline
    from pipeline.model_spec import build_model_from_spec, make_engine

    m = ckpt.manifest
    if ckpt.method == SOURCE_METHOD:
        raise TTTPipeError(_source_message(ckpt.uri, None))
    model = build_model_from_spec(m["model"], trusted, origin=ckpt.uri)
    try:
        config = engines.config_from_dict(m["method"]["name"], m["method"].get("config", {}))
    except (KeyError, ValueError) as exc:
        msg = exc.args[0] if exc.args else exc
        raise TTTPipeError(f"checkpoint {ckpt.uri}: {msg}") from None
    example = torch.zeros(1, *checkpoint_image_shape(ckpt))
    engine = make_engine(m["method"]["name"], model, example, config, m["model"]["name"])
    _load_strict(engine, ckpt.state_dict, ckpt,
                 f"model {m['model']['name']!r} with method {m['method']['name']!r}")
    return engine.to(device)
