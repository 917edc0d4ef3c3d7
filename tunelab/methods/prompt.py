"""Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning") via `peft`: trainable soft-prompt embeddings prepended to the input, optionally
initialised from a text. The task head trains in full and is saved with the prompt.
Not mergeable."""

from __future__ import annotations

from typing import Any

from torch import nn

from tunelab.methods.common import head_names, peft_apply, peft_load, peft_save
from tunelab.models import resolve_model

DEFAULT_LR = 3e-2
PLAIN_WEIGHTS = False  # the trained model holds an adapter: `merge` (where there is one) folds it in
PEFT_FORMAT = True  # saved as a PEFT adapter folder
CACHEABLE_FROZEN_LAYERS = False  # no lower layer is frozen whole
VIRTUAL_TOKENS = True  # trains virtual tokens ahead of every row (no packed rows, no merge)
merge = None


def peft_config(model: nn.Module, config: Any, task: Any) -> Any:
    from peft import PromptTuningConfig, PromptTuningInit

    options = config.prompt
    kwargs: dict[str, Any] = {}
    if options.init_text:
        kwargs = {"prompt_tuning_init": PromptTuningInit.TEXT, "prompt_tuning_init_text": options.init_text,
                  "tokenizer_name_or_path": resolve_model(config.model)}  # fmt: skip
    return PromptTuningConfig(
        task_type=task.peft_task_type, num_virtual_tokens=options.num_virtual_tokens,
        modules_to_save=head_names(model, task), **kwargs,
    )  # fmt: skip


def apply(model: nn.Module, config: Any, task: Any) -> nn.Module:
    return peft_apply(model, task, peft_config(model, config, task))


save, load = peft_save, peft_load
