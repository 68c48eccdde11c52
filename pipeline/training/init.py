"""Training from an existing checkpoint (`ttt-pipe train --init CKPT --train aux|all`).

The init checkpoint supplies the model (architecture, kwargs, normalisation: its manifest's
`model` entry; weights: its model part, `pipeline.checkpoint.model_state_dict`, so a `source`
checkpoint from `ttt-pipe import-model` and a TTT/IT3 checkpoint both work) and the dataset (its
manifest's `dataset` entry: the identity and the image shape the model takes). A method's
auxiliary part is always new (seeded by the method config's `seed`): a TTT checkpoint's head is
not carried over into another run, only its model.

Scopes (`TRAIN_SCOPES`):
- ``aux``: the model is frozen (every parameter `requires_grad=False`, the module kept in eval
  mode by `EpochLoop(frozen=...)`: BatchNorm statistics untouched), only the head/embedder
  trains. The written checkpoint's model part is bit-identical to the init's.
- ``all``: model and auxiliary part are fine-tuned jointly (the usual joint loss).

Options that the checkpoint fixes (`--model`, `--model-kwargs`, `--normalize`, `--image-size`,
`--dataset`) are refused with `--init`, except `--dataset folder:PATH` for a checkpoint of an
image folder: a manifest holds the folder's identity (`folder:<dirname>-<hash>`), not where it
is mounted, so the path must be given and must name a folder of that identity.

The driver reads the checkpoint once here (sha-verified); the trainer actor reads it again and
refuses it if its weights' sha256 changed in between (or between an interrupted run and its
resume).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import TTTPipeError

__all__ = ["TRAIN_SCOPES", "InitSource", "check_scope", "resolve_init", "load_init_model"]

TRAIN_SCOPES = ("all", "aux")
_FOLDER = "folder:"


@dataclass(frozen=True)
class InitSource:
    """What `--init` resolved to: the checkpoint and what it fixes for the run."""

    uri: str
    weights_sha256: str
    method: str               # the init checkpoint's own method (source, ttt, it3, ...)
    model: dict               # its manifest's `model` entry (ModelSpec.to_manifest())
    dataset: str              # the dataset form to load the train split of
    image_size: int | None    # for imagenet / folder:PATH: the side the model takes
    trusted: tuple[str, ...]  # modules an import-path model may come from (incl. the env's)

    def manifest_entry(self) -> dict:
        """What the new checkpoint's manifest records of its init."""
        return {"uri": self.uri, "weights_sha256": self.weights_sha256, "method": self.method}


def check_scope(train: str | None, init: str | None) -> str:
    scope = train or "all"
    if scope not in TRAIN_SCOPES:
        raise TTTPipeError(f"--train must be one of {', '.join(TRAIN_SCOPES)}, got {scope!r}")
    if scope == "aux" and init is None:
        raise TTTPipeError("--train aux freezes a trained model: pass --init CKPT (a checkpoint "
                           "from ttt-pipe import-model or train)")
    return scope


def resolve_init(uri: str, *, dataset: str | None = None, model: str | None = None,
                 model_kwargs=None, normalize=None, image_size: int | None = None,
                 trust_model: str | None = None) -> InitSource:
    """Read and check the init checkpoint; one-line TTTPipeError for every conflict."""
    from pipeline.checkpoint import checkpoint_image_shape, load_checkpoint
    from pipeline.datasets import get_dataset
    from pipeline.model_spec import check_trusted, is_import_path, parse_trusted, trusted_modules

    given = [flag for flag, value in (("--model", model), ("--model-kwargs", model_kwargs),
                                      ("--normalize", normalize), ("--image-size", image_size))
             if value is not None]
    if given:
        raise TTTPipeError(f"--init {uri} fixes the model and its input; drop {', '.join(given)}")
    ckpt = load_checkpoint(uri)  # missing, truncated, tampered: one line
    name = ckpt.dataset
    shape = checkpoint_image_shape(ckpt)
    if name.startswith(_FOLDER):
        if dataset is None:
            raise TTTPipeError(f"checkpoint {uri} was trained on image folder {name}, whose path it "
                               "does not record; pass --dataset folder:PATH")
        form, size = dataset, shape[1]
        found = get_dataset(form, size).name
        if found != name:
            raise TTTPipeError(f"--dataset {dataset} is {found}, but checkpoint {uri} was trained "
                               f"on {name}; pass that folder")
    else:
        if dataset is not None:
            raise TTTPipeError(f"--init {uri} fixes the dataset ({name}); drop --dataset")
        form, size = name, (shape[1] if name == "imagenet" else None)
        try:
            get_dataset(form, size)
        except TTTPipeError:
            raise TTTPipeError(f"checkpoint {uri} was trained on {name!r}, which this ttt-pipe "
                               "cannot load; train from a checkpoint of a known dataset") from None
    entry = ckpt.manifest["model"]
    trusted = parse_trusted(trust_model)
    if is_import_path(entry.get("name", "")):
        check_trusted(entry["name"], trusted, uri)  # the same rule as adapting it
        trusted = trusted_modules(trusted)  # the environment's too: the actor may not have it
    return InitSource(uri=uri, weights_sha256=ckpt.manifest["weights_sha256"], method=ckpt.method,
                      model=dict(entry), dataset=form, image_size=size, trusted=trusted)


def load_init_model(uri: str, weights_sha256: str, trusted=()):
    """(the init checkpoint's model with its weights, on the CPU; the checkpoint)."""
    from pipeline.checkpoint import build_model_from_checkpoint, load_checkpoint

    ckpt = load_checkpoint(uri)
    if ckpt.manifest["weights_sha256"] != weights_sha256:
        raise TTTPipeError(f"checkpoint {uri} changed since this run started (its weights' sha256 "
                           f"is {ckpt.manifest['weights_sha256'][:12]}, not {weights_sha256[:12]}); "
                           "rerun the command, or delete the .train-state folder to start over")
    return build_model_from_checkpoint(ckpt, "cpu", trusted), ckpt
