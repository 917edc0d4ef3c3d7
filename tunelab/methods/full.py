"""Full fine-tuning: every weight trains, except by default the input word-embedding table
(`full.train_embeddings`); the run saves a complete Hugging Face model folder.

The table is about half of a small encoder's parameters (11.7M of minilm-l6's 22.7M), yet a
fine-tuning set touches few of its rows: training it costs a dense gradient and optimizer
update per step for little gain. A table tied to the output layer (most causal LMs) trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DEFAULT_LR = 1e-4
PLAIN_WEIGHTS = True  # the trained model is the plain model: `merge` returns it as is
PEFT_FORMAT = False  # plain weights: nothing to save apart from the model
CACHEABLE_FROZEN_LAYERS = False  # no lower layer is frozen whole
VIRTUAL_TOKENS = False


def apply(model: nn.Module, config: Any, task: Any) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    hf = cast("PreTrainedModel", model)
    embeddings = hf.get_input_embeddings()
    output = hf.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = output is not None and output.weight is embeddings.weight
    if not config.full.train_embeddings and not tied:
        embeddings.weight.requires_grad_(False)
    return model


def save(model: nn.Module, out_dir: Path) -> None:
    cast("PreTrainedModel", model).save_pretrained(out_dir)


def load(config: Any, task: Any, model_dir: Path) -> nn.Module:
    return task.build_model(str(model_dir))


def merge(model: nn.Module) -> nn.Module:
    return model  # already plain weights
