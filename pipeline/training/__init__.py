"""The training loop of `ttt-pipe train`, without Ray: recipe, augmentation, batches, epochs, state.

`jobs/train.py` (the Ray trainer actor) drives `EpochLoop` in chunks of batches and writes its
`state_dict()` after every epoch so a killed run resumes (`save_state` / `load_state`);
`init` resolves `--init CKPT --train aux|all` (training from an existing checkpoint's model).
"""

from pipeline.training.augment import AUGMENTS, augment_batch
from pipeline.training.data import Batches, split_train_val
from pipeline.training.init import TRAIN_SCOPES, InitSource, check_scope, load_init_model, resolve_init
from pipeline.training.loop import EpochLoop
from pipeline.training.recipe import (OPTIMIZERS, PRECISIONS, SCHEDULES, TrainRecipe, build_optimizer,
                                      build_scheduler, resolve_recipe)
from pipeline.training.state import load_state, remove_state, save_state, state_uri

__all__ = ["AUGMENTS", "OPTIMIZERS", "PRECISIONS", "SCHEDULES", "TRAIN_SCOPES", "Batches", "EpochLoop",
           "InitSource", "TrainRecipe", "augment_batch", "build_optimizer", "build_scheduler",
           "check_scope", "load_init_model", "load_state", "remove_state", "resolve_init",
           "resolve_recipe", "save_state", "split_train_val", "state_uri"]
