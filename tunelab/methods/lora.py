"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") via `peft`,
with the DoRA (Liu et al., 2024) and rsLoRA (Kalajdzievski, 2023) variants.

The frozen base gains trainable low-rank updates on its linear layers; the task head (and,
for BERT-style encoders, the pooler) trains in full and is saved inside the PEFT adapter
folder as `modules_to_save`, so `PeftModel.from_pretrained(base, run/model)` restores it.

With `lora.quantize=4bit` (QLoRA, Dettmers et al., 2023) the task loads the frozen base in 4-bit
NF4 through bitsandbytes (`TaskBase.pretrained_options`), and peft's
`prepare_model_for_kbit_training` readies it before the adapters go on. CUDA only.
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
    if getattr(model, "is_loaded_in_4bit", False):  # lora.quantize=4bit: the task loaded the base in NF4
        from peft import prepare_model_for_kbit_training

        # norms and the head in float32, input gradients on (the frozen embeddings give none)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )  # fmt: skip
    return peft_apply(model, task, peft_config(model, config, task))


save, load, merge = peft_save, peft_load, peft_merge
