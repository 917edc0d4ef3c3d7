"""What every task shares: the split container, tokenizing texts, padding a batch, and the
logits of a list of examples (`predict_logits`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from tunelab.config import Config
from tunelab.data import Table, sample, stratified_split
from tunelab.device import autocast, to_device
from tunelab.errors import DataError
from tunelab.models import resolve_model


class Task(Protocol):
    """What every task provides: how rows become model inputs, which loss and metrics apply,
    and how outputs read. The loop and the commands know tasks only through this."""

    name: str  # as `task:` spells it
    default_metric: str  # the validation metric that picks the best model unless train.metric_for_best says
    head_modules: tuple[str, ...]  # names of the task-head modules (always trained and saved)
    peft_task_type: str  # peft's TaskType for this task
    generative: bool  # generates text (causal-lm, seq2seq): scored on generations too
    fresh_inputs: bool  # `collate` draws new inputs at every call (masking): nothing may cache them
    scores_baseline: bool  # eval.json also holds the un-tuned model's metrics ("baseline")
    config: Config
    labels: list[str] | None  # label names, where the task has them

    @property
    def pad_multiple(self) -> int:
        """`collate` rounds a batch's padded length up to a multiple of this."""
        ...

    def load_splits(self, tokenizer: Any) -> Splits:
        """Read, validate, split and tokenize the config's data files."""
        ...

    def read(self, path: str, need_labels: bool = True) -> Table:
        """One data file as a table, validated (errors name the file, row and column)."""
        ...

    def encode(self, table: Table, tokenizer: Any, with_labels: bool = True) -> list[dict[str, Any]]:
        """Tokenize a table into examples (dicts of token lists, + "labels")."""
        ...

    def encode_inputs(self, texts: list[str], tokenizer: Any, pairs: list[str] | None = None) -> list[dict]:
        """Tokenize raw inputs for prediction."""
        ...

    def build_model(self, path: str) -> torch.nn.Module:
        """The pretrained model at `path` with this task's head."""
        ...

    def base_model(self) -> torch.nn.Module:
        """The un-tuned pretrained model with this task's head (the baseline of the report)."""
        ...

    def collate(self, examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        """Pad examples into one batch of tensors."""
        ...

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """What the loss is averaged over in a batch: examples, or target tokens."""
        ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's summed loss (the loop divides by the step's units)."""
        ...

    def outputs(self, model: torch.nn.Module, examples: list[dict[str, Any]], pad_id: int, batch_size: int,
                device: torch.device, dtype: torch.dtype | None) -> list[Any]:  # fmt: skip
        """What `metrics` and `predictions` read, one entry per example."""
        ...

    def metrics(self, outputs: list[Any], examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Scores of `outputs` against the examples' labels."""
        ...

    def calibrate(self, outputs: list[Any], examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Settings tuned on validation after training (saved in the run's config)."""
        ...

    def predictions(self, outputs: list[Any], examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """What a person reads: label names, entity spans, values or text."""
        ...

    def probe_batch(self, examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        """Model inputs for a few examples, to compare two models' logits."""
        ...


class TaskBase:
    """Defaults shared by every task: model outputs come from one forward pass per batch."""

    name: str
    default_metric: str
    head_modules: tuple[str, ...]
    peft_task_type: str
    config: Config
    labels: list[str] | None
    generative = False  # generates text (causal-lm, seq2seq): scored on generations too
    fresh_inputs = False  # `collate` draws new inputs at every call (masking): nothing may cache them
    scores_baseline = False  # eval.json also holds the un-tuned model's metrics ("baseline")
    column_flags = False  # a missing column names the flag of `eval` / `predict` (--text-column) to give

    @property
    def pad_multiple(self) -> int:
        """`collate` rounds a batch's padded length up to a multiple of this."""
        return 1

    def build_model(self, path: str) -> torch.nn.Module:
        """The pretrained model at `path` with this task's head (each task defines it)."""
        raise NotImplementedError

    def pretrained_options(self) -> dict[str, Any]:
        """What `build_model` adds to `from_pretrained`: with `lora.quantize=4bit` (QLoRA, CUDA
        only: the config refuses it elsewhere), the base in 4-bit NF4 with double quantization,
        computing in bf16 (fp16 on GPUs without bf16), on this process's GPU."""
        if self.config.lora.quantize != "4bit":
            return {}
        from transformers import BitsAndBytesConfig  # (transformers loads slowly; bitsandbytes is optional)

        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)  # fmt: skip
        return {"quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}}

    def base_model(self) -> torch.nn.Module:
        """The un-tuned pretrained model with this task's head, for the baseline rows of the report."""
        return self.build_model(resolve_model(self.config.model))

    def collate(self, examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        """Pad examples into one batch of tensors (each task defines it)."""
        raise NotImplementedError

    def outputs(self, model: torch.nn.Module, examples: list[dict[str, Any]], pad_id: int, batch_size: int,
                device: torch.device, dtype: torch.dtype | None) -> list[Any]:  # fmt: skip
        """What `metrics` and `predictions` read: here the logits of each example."""
        return predict_logits(model, examples, self.collate, pad_id, batch_size, device, dtype)

    def probe_batch(self, examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        """Model inputs for a few examples, to compare two models' logits (merge and export checks)."""
        batch = self.collate(examples, pad_id)
        batch.pop("labels", None)
        return batch


@dataclass
class Splits:
    """Encoded examples per split; each example is a dict of token lists (+ "labels")."""

    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]] | None = None
    files: dict[str, str] = field(default_factory=dict)


def split_tables(task: Any, train: Any, strata: list[Any] | None,
                 few_shot: Callable[[Any], Any] | None = None) -> tuple[Any, Any, Any]:  # fmt: skip
    """(train, validation, test) tables as training uses them: the validation file, or a
    stratified share of train; seeded subsets (`max_train_samples`, `max_eval_samples`); the
    test file. `few_shot` picks training rows before the subset is taken."""
    d, seed = task.config.data, task.config.seed
    if d.validation:
        validation = task.read(d.validation)
    else:
        train, validation = stratified_split(train, strata or [0] * len(train), d.validation_split, seed)
        if not len(validation):
            raise DataError(
                f"{d.train}: too few rows to hold out a validation set ({len(train)} rows, every class "
                f"needs 2+); give data.validation=<file> or add rows"
            )
    if few_shot is not None:
        train = few_shot(train)
    train = sample(train, d.max_train_samples, seed)
    validation = sample(validation, d.max_eval_samples, seed)
    test = sample(task.read(d.test), d.max_eval_samples, seed) if d.test else None
    return train, validation, test


def split_and_encode(task: Any, train: Any, strata: list[Any] | None, tokenizer: Any,
                     few_shot: Callable[[Any], Any] | None = None,
                     augment: Callable[[Any], Any] | None = None) -> Splits:  # fmt: skip
    """The shared tail of every task's `load_splits`: `split_tables`, then `encode_splits`."""
    return encode_splits(task, split_tables(task, train, strata, few_shot), tokenizer, augment)


def encode_splits(task: Any, tables: tuple[Any, Any, Any], tokenizer: Any,
                  augment: Callable[[Any], Any] | None = None) -> Splits:  # fmt: skip
    """Tokenize (train, validation, test) tables; `augment` adds rows to the training table first."""
    d = task.config.data
    train, validation, test = tables
    return Splits(
        train=task.encode(augment(train) if augment is not None else train, tokenizer),
        validation=task.encode(validation, tokenizer),
        test=task.encode(test, tokenizer) if test is not None else None,
        files={k: v for k, v in (("train", d.train), ("validation", d.validation), ("test", d.test)) if v},
    )


def encode_texts(tokenizer: Any, texts: list[str], pairs: list[str] | None, max_length: int) -> list[dict]:
    """Tokenize without padding (batches are padded later, to their own longest row).
    Segment ids are kept only for text pairs: for one text they are all zero, which is what
    models assume by default, and decoder-only models do not accept them."""
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "token_type_ids") if k in enc and (k == "input_ids" or pairs)]
    return [{k: enc[k][i] for k in keys} for i in range(len(texts))]


def padded_length(longest: int, multiple: int = 1) -> int:
    """`longest` rounded up to a multiple of `multiple`."""
    return -(-longest // multiple) * multiple


def pad_labels(examples: list[dict[str, Any]], length: int) -> torch.Tensor:
    """Per-token label lists padded on the right to `length` with -100 (no target)."""
    return torch.tensor([list(e["labels"]) + [-100] * (length - len(e["labels"])) for e in examples])


def collate_tokens(examples: list[dict[str, Any]], pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Pad token lists on the right to the longest example (rounded up to `multiple`); add the
    attention mask."""
    longest = padded_length(max(len(e["input_ids"]) for e in examples), multiple)
    # one tensor from padded lists: far cheaper than a copy per row
    batch: dict[str, torch.Tensor] = {
        "input_ids": torch.tensor(
            [list(e["input_ids"]) + [pad_id] * (longest - len(e["input_ids"])) for e in examples]
        ),
        "attention_mask": torch.tensor(
            [[1] * len(e["input_ids"]) + [0] * (longest - len(e["input_ids"])) for e in examples]
        ),
    }
    if "token_type_ids" in examples[0]:
        batch["token_type_ids"] = torch.tensor(
            [list(e["token_type_ids"]) + [0] * (longest - len(e["token_type_ids"])) for e in examples]
        )
    if "labels" in examples[0]:
        batch["labels"] = torch.tensor([e["labels"] for e in examples])
    return batch


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module,
    examples: list[dict[str, Any]],
    collate: Callable,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None,
) -> list[np.ndarray]:
    """Model outputs for each example, in their order: a vector per example for sequence
    tasks, a (tokens, labels) array for token tasks. Batches are length-sorted to cut padding."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    out: list[np.ndarray] = [np.zeros(0)] * len(examples)
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        batch = collate([examples[i] for i in chunk], pad_id)
        batch.pop("labels", None)
        with autocast(device, dtype):
            logits = model(**to_device(batch, device)).logits.float().cpu().numpy()
        # soft-prompt methods prepend virtual tokens: the real ones follow them
        offset = logits.shape[1] - batch["input_ids"].shape[1] if logits.ndim == 3 else 0
        for row, i in enumerate(chunk):
            n = len(examples[i]["input_ids"])
            out[i] = logits[row, offset : offset + n] if logits.ndim == 3 else logits[row]
    model.train(was_training)
    return out
