"""What every task shares: the split container, tokenizing texts, and padding a batch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


class Task:
    """Defaults shared by every task: model outputs come from one forward pass per batch."""

    generative = False  # generates text (causal-lm, seq2seq): scored on generations too
    pad_multiple = 1  # `collate` rounds a batch's padded length up to a multiple of this

    def outputs(self, model: torch.nn.Module, examples: list[dict[str, Any]], pad_id: int, batch_size: int,
                device: torch.device, dtype: torch.dtype | None) -> list[Any]:  # fmt: skip
        """What `metrics` and `predictions` read: here the logits of each example."""
        from tunelab.loop import predict_logits

        return predict_logits(model, examples, self.collate, pad_id, batch_size, device, dtype)  # type: ignore[attr-defined]

    def probe_batch(self, examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        """Model inputs for a few examples, to compare two models' logits (merge and export checks)."""
        batch = self.collate(examples, pad_id)  # type: ignore[attr-defined]
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
    from tunelab.data import sample, stratified_split
    from tunelab.errors import DataError

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
