"""The model zoo: architectures by name, each taking pixel-unit images and returning logits.

Every zoo model takes **pixel-unit** images (N, C, H, W) and returns **logits** (N, classes);
its first module (`normalize`) applies the normalisation its weights expect, so shards, engines
and jobs never normalise by hand. `model_kwargs_for(name, spec)` gives a model's kwargs for a
dataset; `default_layer(name, method)` the layer each engine attaches to by default.
"""

from __future__ import annotations

# The zoo's modules register their models on import (explicit, in the zoo table's order).
from pipeline.models import seed, resnet_cifar, wide_resnet, torchvision_resnet  # noqa: F401
from pipeline.models.kwargs import (IMAGENET_MEAN, IMAGENET_STD, NORMALIZE_CHOICES, model_kwargs_for,
                                    normalize_label, parse_normalize, resolve_normalization)
from pipeline.models.normalize import Normalize
from pipeline.models.registry import (ZooEntry, build_model, default_layer, get_entry, list_models,
                                      register_model)
from pipeline.models.seed import SeedCNN, SeedCNNBN, SeedResCNN

__all__ = ["Normalize", "SeedCNN", "SeedResCNN", "SeedCNNBN", "ZooEntry", "build_model", "list_models",
           "register_model", "get_entry", "default_layer", "model_kwargs_for", "parse_normalize",
           "resolve_normalization", "normalize_label", "NORMALIZE_CHOICES", "IMAGENET_MEAN",
           "IMAGENET_STD"]
