"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") via `peft`,
with the DoRA (Liu et al., 2024) and rsLoRA (Kalajdzievski, 2023) variants.

The frozen base gains trainable low-rank updates on its linear layers; the task head (and,
for BERT-style encoders, the pooler) trains in full and is saved inside the PEFT adapter
folder as `modules_to_save`, so `PeftModel.from_pretrained(base, run/model)` restores it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tunelab.methods.common import head_names, peft_apply, peft_load, peft_merge, peft_save

DEFAULT_LR = 1e-3
PLAIN_WEIGHTS = False  # the trained model holds an adapter: `merge` (where there is one) folds it in
PEFT_FORMAT = True  # saved as a PEFT adapter folder
CACHEABLE_FROZEN_LAYERS = False  # no lower layer is frozen whole
VIRTUAL_TOKENS = False


def peft_config(model: nn.Module, config: Any, task: Any) -> Any:
    from peft import LoraConfig

    options = config.lora
    head = head_names(model, task)
    targets = "all-linear" if options.target_modules == "auto" else options.target_modules
    return LoraConfig(
        task_type=task.peft_task_type, r=options.rank, lora_alpha=options.alpha,
        lora_dropout=options.dropout, target_modules=targets, modules_to_save=head,
        exclude_modules=head or None, use_dora=options.use_dora, use_rslora=options.use_rslora,
    )  # fmt: skip


def apply(model: nn.Module, config: Any, task: Any) -> nn.Module:
    return peft_apply(model, task, peft_config(model, config, task))


save, load, merge = peft_save, peft_load, peft_merge
