"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") via `peft`.

The frozen base gains trainable low-rank updates on its linear layers; the task head (and,
for BERT-style encoders, the pooler) trains in full and is saved inside the PEFT adapter
folder as `modules_to_save`, so `PeftModel.from_pretrained(base, run/model)` restores it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tunelab.models import resolve_model

DEFAULT_LR = 1e-3


def _present(model: torch.nn.Module, names: tuple[str, ...]) -> list[str]:
    have = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    top = {name for name, _ in model.named_children()}
    base = getattr(model, "base_model_prefix", "")
    inner = {name for name, _ in getattr(model, base).named_children()} if hasattr(model, base) else set()
    return [n for n in names if n in have and (n in top or n in inner)]


def lora_config(model: torch.nn.Module, config: Any, task: Any) -> Any:
    from peft import LoraConfig

    options = config.lora
    keep = _present(model, tuple(task.head_modules) + (("pooler",) if options.train_pooler else ()))
    targets: Any = options.target_modules
    if targets == "auto":
        targets = "all-linear"
    return LoraConfig(
        r=options.rank,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=targets,
        modules_to_save=keep,
        exclude_modules=keep or None,
    )


def apply(model: torch.nn.Module, config: Any, task: Any) -> torch.nn.Module:
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, config, task))


def save(model: torch.nn.Module, out_dir: Path) -> None:
    model.save_pretrained(out_dir)


def load(config: Any, task: Any, model_dir: Path) -> torch.nn.Module:
    from peft import PeftModel

    base = task.build_model(resolve_model(config.model))
    return PeftModel.from_pretrained(base, str(model_dir))
