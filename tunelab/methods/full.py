"""Full fine-tuning: every weight trains; the run saves a complete Hugging Face model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

DEFAULT_LR = 1e-4


def apply(model: nn.Module, config: Any, task: Any) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def save(model: nn.Module, out_dir: Path) -> None:
    model.save_pretrained(out_dir)


def load(config: Any, task: Any, model_dir: Path) -> nn.Module:
    return task.build_model(str(model_dir))


def merge(model: nn.Module) -> nn.Module:
    return model  # already plain weights
