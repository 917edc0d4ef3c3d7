"""Freezing all but the top layers: the top `freeze.trainable_layers` transformer blocks, and
everything above them (final norm, pooler, task head), train; the rest stays as pretrained.

The run saves only the trained parameters (`trained.safetensors`) and rebuilds the frozen
rest from the base model when loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from torch import nn

from tunelab.methods.common import base_model, freeze_all_but, load_trainable, save_trainable
from tunelab.models import block_stacks

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DEFAULT_LR = 1e-4
PLAIN_WEIGHTS = True  # the trained layers are plain layers: `merge` returns the model as is
PEFT_FORMAT = False  # plain weights: nothing to save apart from the model
CACHEABLE_FROZEN_LAYERS = True  # the lower layers are frozen whole: their outputs can be computed once
VIRTUAL_TOKENS = False


def trained_prefixes(model: nn.Module, config: Any) -> list[str]:
    """Parameter-name prefixes that train: top blocks of each stack, and every module that
    comes after the stack (norms, pooler, head); optionally the input embeddings."""
    n = config.freeze.trainable_layers
    prefixes = []
    stacks = block_stacks(model)
    for stack_name, blocks in stacks:
        prefixes += [f"{stack_name}.{i}" for i in range(max(0, len(blocks) - n), len(blocks))]
    # parameters registered after the last block stack sit above it (final norm, pooler, head)
    names = [name for name, _ in model.named_parameters()]
    last_stack = stacks[-1][0] + "."
    last_block = max(i for i, name in enumerate(names) if name.startswith(last_stack))
    prefixes += names[last_block + 1 :]
    if config.freeze.train_embeddings:
        embeddings = cast("PreTrainedModel", model).get_input_embeddings()
        prefixes += [name for name, p in model.named_parameters() if p is embeddings.weight]
    return prefixes


def apply(model: nn.Module, config: Any, task: Any) -> nn.Module:
    freeze_all_but(model, trained_prefixes(model, config))
    return model


def save(model: nn.Module, out_dir: Path) -> None:
    save_trainable(model, out_dir)


def load(config: Any, task: Any, model_dir: Path) -> nn.Module:
    return load_trainable(apply(base_model(config, task), config, task), model_dir)


def merge(model: nn.Module) -> nn.Module:
    return model  # the trained layers already are plain weights
