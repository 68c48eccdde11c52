"""`ttt-pipe import-model`: a pretrained state_dict -> a checkpoint (no Ray: one file in, one out)."""

from __future__ import annotations

import typer

from jobs.commands import DATASET_HELP, check_dataset
from jobs.console import cli_errors, console

__all__ = ["command"]


@cli_errors
def command(
    model: str = typer.Option(..., help="Zoo model (resnet26, wrn28_10, resnet18, resnet50, seed_cnn, ...) "
                                        "or your own package.module:factory."),
    weights: str = typer.Option(..., help="State_dict file (torch.save; loaded with weights_only=True). "
                                          "Wrappers {'state_dict'|'model'|'net': ...} and module./model. "
                                          "prefixes are handled."),
    dataset: str = typer.Option(..., help=f"{DATASET_HELP} The data the model classifies (its identity "
                                          "goes into the manifest).", callback=check_dataset),
    out: str = typer.Option(..., help="Checkpoint directory to write (local path or s3://...)."),
    image_size: int = typer.Option(None, help="Image side for folder:/imagenet data (default 224)."),
    normalize: str = typer.Option(None, help="Normalisation the weights expect: none, dataset, imagenet, "
                                             "MEAN,STD or \\[m1,m2,m3],\\[s1,s2,s3] (default: the model's: "
                                             "wrn28_10 none, resnet18/50 imagenet, others dataset; your own none)."),
    method: str = typer.Option("source", help="source (the model alone; train a method's part on it "
                                              "later) or a method that needs no joint training (norm, "
                                              "tent, eata, sar, memo, cotta, lame): its checkpoint, "
                                              "adapted with it by default (any such method with "
                                              "ttt-pipe adapt --method)."),
    layer: str = typer.Option(None, help="Layer for --method lame (its feature layer; default: the "
                                         "classifier's input)."),
    model_kwargs: str = typer.Option(None, help="""JSON object of extra model kwargs, e.g. '{"norm": "batch"}'."""),
    trust_model: str = typer.Option(None, help="Comma list of modules a model import path may come from "
                                               "(also $TTT_PIPE_TRUSTED_MODULES); --model's own is trusted."),
) -> None:
    """Turn a pretrained state_dict into a checkpoint with the usual manifest and sha256."""
    from pipeline.model_import import import_model

    manifest = import_model(model, weights, dataset, out, normalize=normalize, method=method,
                            model_kwargs=model_kwargs, trust_model=trust_model, image_size=image_size,
                            layer=layer)
    t = manifest["training"]
    console.print(
        f"checkpoint {out}: {manifest['model']['name']} ({manifest['model']['normalize']} normalisation) "
        f"on {manifest['dataset']['name']}, method {manifest['method']['name']}; {t['keys']} tensors"
        f"{' from ' + t['unwrapped'] if t['unwrapped'] else ''}"
        f"{', stripped ' + repr(t['stripped_prefix']) if t['stripped_prefix'] else ''}; "
        f"sha256 {manifest['weights_sha256'][:12]}", highlight=False, soft_wrap=True)
