"""Prefix tuning (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation") via `peft`: trainable key/value vectors prepended in every attention layer.
The task head trains in full and is saved with the prefix. Not mergeable."""

from __future__ import annotations

from typing import Any

from torch import nn

from tunelab.methods.common import head_names, hidden_size, peft_apply, peft_load, peft_save

DEFAULT_LR = 1e-2
PLAIN_WEIGHTS = False  # the trained model holds an adapter: `merge` (where there is one) folds it in
PEFT_FORMAT = True  # saved as a PEFT adapter folder
CACHEABLE_FROZEN_LAYERS = False  # no lower layer is frozen whole
VIRTUAL_TOKENS = True  # trains virtual tokens ahead of every row (no packed rows, no merge)
merge = None


def peft_config(model: nn.Module, config: Any, task: Any) -> Any:
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(
        task_type=task.peft_task_type, num_virtual_tokens=config.prefix.num_virtual_tokens,
        prefix_projection=config.prefix.projection, encoder_hidden_size=hidden_size(model),
        modules_to_save=head_names(model, task),
    )  # fmt: skip


def apply(model: nn.Module, config: Any, task: Any) -> nn.Module:
    return peft_apply(model, task, peft_config(model, config, task))


save, load = peft_save, peft_load
