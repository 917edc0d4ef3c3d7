"""Full fine-tuning: every weight trains; the run saves a complete Hugging Face model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

DEFAULT_LR = 1e-4


def apply(model: torch.nn.Module, config: Any, task: Any) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def save(model: torch.nn.Module, out_dir: Path) -> None:
    model.save_pretrained(out_dir, safe_serialization=True)


def load(config: Any, task: Any, model_dir: Path) -> torch.nn.Module:
    return task.build_model(str(model_dir))
