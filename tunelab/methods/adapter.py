"""Bottleneck adapters (Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP";
Pfeiffer et al., 2021, "AdapterFusion").

A small residual MLP, down-project -> ReLU -> up-project, is applied to the output of each
block's attention output projection and FFN output projection (Houlsby), or of the FFN output
only (Pfeiffer), before the block's own residual and norm. The up-projection starts at zero,
so the adapted model computes exactly what the pretrained one does until training moves it.

Written here because `peft` has no bottleneck adapter and AdapterHub's `adapters` pins
transformers 4.x. It is model-agnostic: the blocks are found by structure (see
`models.block_stacks`), and inside a block the FFN output projection is the linear layer that
maps a wider input back to the hidden size, the attention output projection the last
hidden -> hidden linear layer before it. Adapters hook onto those layers with forward hooks,
so the base model's own modules and parameter names stay untouched. Not mergeable (the
bottleneck is non-linear).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunelab.methods.common import (
    base_model,
    freeze_all_but,
    head_names,
    hidden_size,
    load_trainable,
    save_trainable,
)
from tunelab.models import block_stacks

DEFAULT_LR = 2e-3
PLAIN_WEIGHTS = False  # the trained model holds an adapter: `merge` (where there is one) folds it in
PEFT_FORMAT = False  # no PEFT format: bottleneck adapters are not PEFT's
CACHEABLE_FROZEN_LAYERS = False  # no lower layer is frozen whole
VIRTUAL_TOKENS = False
ATTRIBUTE = "bottleneck_adapters"  # where the adapters live on the model
merge = None


class Bottleneck(nn.Module):
    """h -> h + up(relu(down(h))), with `up` zero-initialised (identity at the start)."""

    def __init__(self, hidden: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        return hidden_states + self.up(torch.relu(self.down(hidden_states)))


def _features(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a linear-like layer: nn.Linear, or GPT-2's transposed Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor):
        return weight.shape[0], weight.shape[1]  # Conv1D stores its weight as (in, out)
    return None


def output_projections(block: nn.Module, hidden: int) -> dict[str, str]:
    """Names (inside `block`) of the attention and FFN output projections."""
    to_hidden = [(name, f) for name, m in block.named_modules() if (f := _features(m)) and f[1] == hidden]
    wider = [i for i, (_, f) in enumerate(to_hidden) if f[0] > hidden]
    if not wider:
        raise ValueError(f"cannot find the FFN output projection in {type(block).__name__}")
    ffn = max(wider, key=lambda i: to_hidden[i][1][0])
    square = [i for i, (_, f) in enumerate(to_hidden[:ffn]) if f[0] == hidden]
    found = {"ffn": to_hidden[ffn][0]}
    if square:
        found["attention"] = to_hidden[square[-1]][0]
    return found


def targets(model: nn.Module, placement: str) -> list[str]:
    """Full names of the modules whose outputs get an adapter."""
    hidden = hidden_size(model)
    names = []
    for stack_name, blocks in block_stacks(model):
        for i, block in enumerate(blocks):
            found = output_projections(block, hidden)
            where = ("attention", "ffn") if placement == "houlsby" else ("ffn",)
            names += [f"{stack_name}.{i}.{found[k]}" for k in where if k in found]
    return names


def apply(model: nn.Module, config: Any, task: Any) -> nn.Module:
    hidden = hidden_size(model)
    bottleneck = max(1, hidden // config.adapter.reduction_factor)
    modules = dict(model.named_modules())
    adapters = nn.ModuleDict()
    for name in targets(model, config.adapter.placement):
        adapter = Bottleneck(hidden, bottleneck)
        adapters[name.replace(".", "-")] = adapter
        modules[name].register_forward_hook(lambda _m, _args, output, a=adapter: a(output))
    setattr(model, ATTRIBUTE, adapters)
    freeze_all_but(model, [ATTRIBUTE, *head_names(model, task)])
    return model


def save(model: nn.Module, out_dir: Path) -> None:
    save_trainable(model, out_dir)


def load(config: Any, task: Any, model_dir: Path) -> nn.Module:
    return load_trainable(apply(base_model(config, task), config, task), model_dir)
