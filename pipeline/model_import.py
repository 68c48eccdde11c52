"""`import_model`: a pretrained state_dict (yours, RobustBench's, torchvision's) -> a checkpoint.

The file is read with `torch.load(weights_only=True)` (tensors and plain containers only: a
pickle that would run code is refused, nothing is written). Accepted: a raw state_dict or one
inside a common wrapper (`{"state_dict": ...}`, `{"model": ...}`, `{"net": ...}`,
`{"model_state_dict": ...}`), with `module.` (DataParallel) / `model.` prefixes stripped — the
variant that matches the architecture's keys best is taken. Missing/unexpected keys or shape
mismatches are one line with counts and a few names. The result is the usual checkpoint
(pipeline/checkpoint.py: manifest + sha256, atomic), by default a `source` checkpoint: the model
alone, no method part (adapt it with a method that needs no joint training, or train TTT/IT3's
auxiliary part on it first). `method` a method without joint training (norm, tent, eata, ...)
writes that method's checkpoint: its default config (layer: the zoo's, or `layer`) and the
engine's state_dict, the method's own state as the engine initialises it; `ttt-pipe adapt`
then runs that method by default (any other such method with `--method`, pipeline/methods.py).
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pipeline import storage
from pipeline.errors import TTTPipeError

__all__ = ["WRAPPER_KEYS", "STRIP_PREFIXES", "read_weights", "unwrap_state_dict", "match_state_dict",
           "import_model"]

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "ema", "params")
STRIP_PREFIXES = ("module.", "model.")
_SHOW = 4  # key names shown per kind in an error


def read_weights(uri: str) -> tuple[Any, str]:
    """`torch.load(weights_only=True)` of a local path or URI -> (object, sha256 of the file)."""
    try:
        data = storage.read_bytes(uri)
    except TTTPipeError:
        raise
    except (FileNotFoundError, OSError) as exc:
        raise TTTPipeError(f"cannot read weights {uri}: {str(exc).splitlines()[0]}") from None
    sha = hashlib.sha256(data).hexdigest()
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- unpickling fails in many types
        text = str(exc)
        code = [line.strip() for line in text.splitlines() if "GLOBAL" in line or "global" in line]
        code = code or _pickle_globals(data)
        if code:
            raise TTTPipeError(
                f"weights {uri} are not plain tensors ({code[0][:160]}); loading them would run code, "
                "so they are refused: save model.state_dict() with torch.save and import that") from None
        detail = next((line.strip() for line in text.splitlines() if "Unsupported" in line),
                      (text.strip().splitlines() or [type(exc).__name__])[0])
        raise TTTPipeError(f"cannot load weights {uri} ({detail[:160]}): not a torch.save file, or "
                           "damaged; give a file written by torch.save(model.state_dict(), path)") from None
    return obj, sha


def _pickle_globals(data: bytes) -> list[str]:
    """The Python objects a plain pickle would import (read with pickletools: nothing runs)."""
    import pickletools

    found, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if op.name == "GLOBAL":
                found.append("GLOBAL " + str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"GLOBAL {strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # noqa: BLE001 -- not a (complete) pickle: nothing to report
        pass
    return found


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def unwrap_state_dict(obj: Any, uri: str = "") -> tuple[dict[str, torch.Tensor], str]:
    """The state_dict in `obj` and where it was (e.g. `["state_dict"]`); one-line error if none."""
    path = ""
    for _ in range(4):
        if _is_state_dict(obj):
            return dict(obj), path
        if not isinstance(obj, Mapping):
            break
        key = next((k for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if key is None:
            break
        obj, path = obj[key], f'{path}["{key}"]'
    keys = ", ".join(map(str, list(obj)[:6])) if isinstance(obj, Mapping) else type(obj).__name__
    raise TTTPipeError(f"weights {uri} hold no state_dict (found: {keys}); give a file of "
                       "torch.save(model.state_dict(), path), or one with it under "
                       f"{', '.join(WRAPPER_KEYS[:4])}")


def _variants(state: dict[str, torch.Tensor]):
    """state as it is, then with every common prefix of STRIP_PREFIXES stripped, in turn."""
    seen, todo = [], [("", state)]
    while todo:
        stripped, sd = todo.pop(0)
        seen.append((stripped, sd))
        for prefix in STRIP_PREFIXES:
            if sd and all(k.startswith(prefix) for k in sd):
                todo.append((stripped + prefix, {k[len(prefix):]: v for k, v in sd.items()}))
    return seen


def match_state_dict(model: nn.Module, state: dict[str, torch.Tensor], uri: str = "",
                     model_name: str = "") -> tuple[dict[str, torch.Tensor], str]:
    """`state` with the prefixes stripped that make it fit `model`; one-line error otherwise."""
    expected = model.state_dict()
    stripped, best = max(_variants(state), key=lambda v: len(set(v[1]) & set(expected)))
    missing = [k for k in expected if k not in best]
    unexpected = [k for k in best if k not in expected]
    what = f"weights {uri} do not fit model {model_name or type(model).__name__}"
    if missing or unexpected:
        def few(keys):
            return ", ".join(keys[:_SHOW]) + (", ..." if len(keys) > _SHOW else "")

        parts = ([f"{len(missing)} missing ({few(missing)})"] if missing else []) + (
            [f"{len(unexpected)} unexpected ({few(unexpected)})"] if unexpected else [])
        raise TTTPipeError(f"{what}: {'; '.join(parts)} of {len(expected)} keys; check --model and "
                           "--model-kwargs (another architecture or depth?)")
    wrong = [(k, tuple(best[k].shape), tuple(v.shape)) for k, v in expected.items()
             if tuple(best[k].shape) != tuple(v.shape)]
    if wrong:
        k, theirs, ours = wrong[0]
        raise TTTPipeError(f"{what}: {len(wrong)} shape mismatch(es), e.g. {k} is {theirs} in the file "
                           f"but {ours} in the model; check --model-kwargs (num_classes?) and --dataset")
    return best, stripped


def import_model(model: str, weights: str, dataset: str, out: str, *, normalize: Any = None,
                 method: str = "source", model_kwargs: str | dict | None = None,
                 trust_model: str | None = None, layer: str | None = None,
                 image_size: int | None = None) -> dict[str, Any]:
    """Check everything, then write the checkpoint at `out` atomically; return its manifest."""
    from pipeline.checkpoint import SOURCE_METHOD, dataset_entry, save_checkpoint
    from pipeline.datasets import get_dataset
    from pipeline.model_spec import (build_bare_model, check_model_name, is_import_path, layer_for,
                                     make_engine, parse_import_path, parse_trusted, resolve_model_spec,
                                     wrap_normalization)

    started = time.perf_counter()
    if not str(out).strip():
        raise TTTPipeError("--out is empty; name the checkpoint directory, e.g. ckpt/resnet50")
    check_model_name(model)
    ds = get_dataset(dataset, image_size)
    trusted = parse_trusted(trust_model)
    if is_import_path(model):  # named on the command line: trusted for this command
        trusted = tuple(dict.fromkeys(trusted + (parse_import_path(model)[0],)))
    spec = resolve_model_spec(model, ds, normalize=normalize, model_kwargs=model_kwargs)
    obj, file_sha = read_weights(weights)
    state, where = unwrap_state_dict(obj, weights)
    bare = build_bare_model(spec, trusted)
    state, stripped = match_state_dict(bare, state, weights, model)
    bare.load_state_dict(state)
    net = wrap_normalization(spec, bare).eval()
    example = torch.zeros(2, *(int(v) for v in ds.image_shape))
    try:
        with torch.no_grad():
            logits = net(example)
    except Exception as exc:  # noqa: BLE001 -- the model's forward on this data's shape
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TTTPipeError(f"model {model} fails on {dataset} images {tuple(example.shape)}: "
                           f"{first[:200]}; check --model and --dataset") from None
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] != ds.num_classes:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TTTPipeError(f"model {model} gives outputs {got} for {tuple(example.shape)} but {dataset} "
                           f"has {ds.num_classes} classes; it must return logits (N, {ds.num_classes})")
    if method == SOURCE_METHOD:
        method_entry, weights_out = {"name": SOURCE_METHOD, "config": {}}, net.state_dict()
    else:
        import engines

        try:
            engine_cls = engines.get_engine(method)
        except (KeyError, ValueError) as exc:
            raise TTTPipeError(f"{exc.args[0] if exc.args else exc} (or source)") from None
        config_cls = engine_cls.config_cls
        chosen = layer_for(model, method, layer, net) if (layer or config_cls.requires_layer) else None
        config = config_cls(**({"layer": chosen} if chosen else {}))
        engine = make_engine(method, net, example[:1], config, model)
        # A method without joint training has no trained part: its own state (method_state.*,
        # e.g. a step counter, CoTTA's teacher) is stored as the engine initialises it.
        aux = sorted({k.split(".")[0] for k in engine.state_dict() if not k.startswith("model.")}
                     if engine_cls.needs_joint_training else ())
        if aux:
            raise TTTPipeError(
                f"{method} has an auxiliary part ({', '.join(aux)}) that needs training: import with "
                f"--method source, then ttt-pipe train --method {method} --init CKPT --train aux")
        method_entry, weights_out = {"name": method, "config": config.to_dict()}, engine.state_dict()
    manifest = {
        "model": spec.to_manifest(),
        "method": method_entry,
        "dataset": dataset_entry(ds),
        "training": {"source": "import-model", "weights": str(weights), "weights_file_sha256": file_sha,
                     "unwrapped": where, "stripped_prefix": stripped, "keys": len(state),
                     "epochs": 0, "batch_size": None, "lr": None, "optimizer": None, "seed": None,
                     "limit": None, "samples": 0, "metrics": [],
                     "seconds": round(time.perf_counter() - started, 3), "device": "cpu",
                     "torch": torch.__version__},
    }
    log.info("importing %s (%d tensors%s%s) as %s", weights, len(state),
             f", from {where}" if where else "", f", stripped {stripped!r}" if stripped else "", model)
    return save_checkpoint(out, weights_out, manifest)
