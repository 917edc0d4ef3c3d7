"""Loading what `tunelab serve` serves: a run directory, or a plain Hugging Face folder.

A folder from `tunelab export --merge` has no tunelab config; its task is read from the model's
architecture and its labels from the model config, so it answers like the run it came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import transformers

from tunelab.config import load_config
from tunelab.device import pick_device
from tunelab.errors import TunelabError
from tunelab.models import load_tokenizer, quiet_transformers
from tunelab.run import Run
from tunelab.tasks import TASKS


def task_of(hf: Any, path: Path) -> str:
    """The tunelab task of a Hugging Face model config, from its architecture.

    Raises:
        TunelabError: an architecture no task serves.
    """
    arch = " ".join(hf.architectures or [])
    if "TokenClassification" in arch:
        return "token-classification"
    if "SequenceClassification" in arch:
        return "regression" if hf.problem_type == "regression" else "classification"
    if getattr(hf, "is_encoder_decoder", False):
        return "seq2seq"
    if "CausalLM" in arch:
        return "causal-lm"
    raise TunelabError(f"{path}: cannot tell the task from the architecture {arch or '(none)'}")


def load_served(path: str | Path) -> Run:
    """A run directory, or a plain Hugging Face folder (e.g. from `tunelab export --merge`).

    Raises:
        TunelabError: the folder is neither, or its architecture has no tunelab task.
    """
    path = Path(path)
    if (path / "config.yaml").is_file():
        return Run.load(path)
    if not (path / "config.json").is_file():
        raise TunelabError(
            f"{path} is neither a tunelab run (config.yaml) nor a Hugging Face model folder (config.json)"
        )
    with quiet_transformers():
        hf = transformers.AutoConfig.from_pretrained(path)
    task_name = task_of(hf, path)
    tokenizer = load_tokenizer(str(path))
    overrides: dict[str, Any] = {"model": str(path), "task": task_name, "method": "full"}
    if task_name in ("classification", "token-classification"):
        overrides["data.labels"] = [hf.id2label[i] for i in range(len(hf.id2label))]
    if task_name == "classification" and hf.problem_type == "multi_label_classification":
        overrides["classification.multi_label"] = True
    if task_name == "causal-lm":
        overrides["data.format"] = "messages" if tokenizer.chat_template else "text"
    config = load_config(**overrides)
    task = TASKS[task_name](config)
    with quiet_transformers():
        model = task.build_model(str(path)).to(pick_device()).eval()
    return Run(path, config, task, model, tokenizer)
