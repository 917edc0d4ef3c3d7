"""IA3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning") via `peft`: learned vectors rescale keys, values and the FFN
activations; the task head trains in full and is saved with the adapter."""

from __future__ import annotations

from typing import Any

from torch import nn

from tunelab.methods.common import head_names, peft_apply, peft_load, peft_merge, peft_save

DEFAULT_LR = 1e-2
PLAIN_WEIGHTS = False  # the trained model holds an adapter: `merge` (where there is one) folds it in
PEFT_FORMAT = True  # saved as a PEFT adapter folder
CACHEABLE_FROZEN_LAYERS = False  # no lower layer is frozen whole
VIRTUAL_TOKENS = False


def peft_config(model: nn.Module, config: Any, task: Any) -> Any:
    from peft import IA3Config

    targets = config.ia3.target_modules
    kwargs: dict[str, Any] = {}
    if targets != "auto":
        kwargs = {"target_modules": targets, "feedforward_modules": []}
    return IA3Config(task_type=task.peft_task_type, modules_to_save=head_names(model, task), **kwargs)


def apply(model: nn.Module, config: Any, task: Any) -> nn.Module:
    return peft_apply(model, task, peft_config(model, config, task))


save, load, merge = peft_save, peft_load, peft_merge
