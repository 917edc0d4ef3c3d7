"""Loading what `tunelab serve` serves: a run directory, a plain Hugging Face folder, or an ONNX
export (`tunelab.onnx_model`, run by ONNX Runtime).

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
from tunelab.onnx_model import OnnxRun, is_onnx_export, load_onnx
from tunelab.run import Run
from tunelab.serve.gguf_backend import GgufRun, load_gguf
from tunelab.tasks import TASKS


def task_of(hf: Any, path: Path) -> str:
    """The tunelab task of a Hugging Face model config, from its architecture.

    Raises:
        TunelabError: an architecture no task serves.
    """
    arch = " ".join(hf.architectures or [])
    if "TokenClassification" in arch:
        return "token-classification"
    if "QuestionAnswering" in arch:
        return "question-answering"
    if "MaskedLM" in arch:
        return "masked-lm"
    if "SequenceClassification" in arch:
        return "regression" if hf.problem_type == "regression" else "classification"
    if getattr(hf, "is_encoder_decoder", False):
        return "seq2seq"
    if "CausalLM" in arch:
        return "causal-lm"
    raise TunelabError(f"{path}: cannot tell the task from the architecture {arch or '(none)'}")


def load_served(path: str | Path) -> Run | OnnxRun | GgufRun:
    """A run directory, a plain Hugging Face folder (e.g. from `tunelab export --merge`), or an
    ONNX export (`tunelab export --onnx`, run by ONNX Runtime: its int8 graph where it has one), or
    a GGUF file or export (`tunelab export --gguf`, run by llama.cpp).

    Raises:
        TunelabError: the folder is neither, or its architecture has no tunelab task.
    """
    path = Path(path)
    if (path / "config.yaml").is_file():
        return Run.load(path)
    if is_onnx_export(path):
        return load_onnx(path)
    gguf = load_gguf(path)  # a .gguf file, or an export folder holding one (llama-cpp-python)
    if gguf is not None:
        return gguf
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
