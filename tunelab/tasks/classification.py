"""Text classification (single-label): text (+ optional text pair) -> one of N labels.

Encoder or decoder models with a sequence-classification head (`AutoModelForSequenceClassification`),
cross-entropy loss; accuracy, precision/recall/F1 (macro, micro, per class) and the confusion
matrix.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tunelab.config import Config
from tunelab.data import Table, is_missing, read_table, require_columns, sample, stratified_split
from tunelab.errors import DataError
from tunelab.metrics import classification_metrics
from tunelab.tasks.base import Splits, collate_tokens, encode_texts


def label_name(value: Any) -> str:
    """Normalise a label cell: 1, 1.0 and "1" all become "1"."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def sort_labels(names: set[str]) -> list[str]:
    """Integer-like labels in numeric order ("2" before "10"), others alphabetically."""
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))  # the tie-break keeps "01"/"1" in a fixed order
    return sorted(names)


class ClassificationTask:
    name = "classification"
    default_metric = "accuracy"
    # the task head: HF names of the fresh classifier, plus the pretrained pooler of BERT-style
    # encoders, which feeds only the head and so trains with it
    head_modules = ("classifier", "score", "pooler")
    peft_task_type = "SEQ_CLS"

    def __init__(self, config: Config, labels: list[str] | None = None):
        self.config = config
        self.labels = labels or config.data.labels

    # ----------------------------------------------------------------- data
    def _column_keys(self) -> dict[str, str]:
        d = self.config.data
        keys = {d.text_column: "data.text_column", d.label_column: "data.label_column"}
        if d.text_pair_column:
            keys[d.text_pair_column] = "data.text_pair_column"
        return keys

    def read(self, path: str, need_labels: bool = True) -> Table:
        """Read and check a file: columns exist, texts non-empty, labels present."""
        d = self.config.data
        table = read_table(path, d.format)
        keys = self._column_keys()
        require_columns(table, [c for c in keys if need_labels or c != d.label_column], keys)
        text_columns = [d.text_column] + ([d.text_pair_column] if d.text_pair_column else [])
        for i, row in enumerate(table.rows):
            for column in text_columns:
                if is_missing(row.get(column)):
                    raise DataError(
                        f"{table.where(i)}: column '{column}' is empty; fill in the text or remove the row"
                    )
            if need_labels and is_missing(row.get(d.label_column)):
                raise DataError(
                    f"{table.where(i)}: column '{d.label_column}' has no label; fill it in or remove the row"
                )
        return table

    def label_ids(self, table: Table) -> list[int]:
        """Map each row's label to its id; a label unseen in training is an error."""
        index = {name: i for i, name in enumerate(self.labels)}
        ids = []
        for i, row in enumerate(table.rows):
            name = label_name(row[self.config.data.label_column])
            if name not in index:
                raise DataError(
                    f"{table.where(i)}: label '{name}' never appears in the training data "
                    f"(known labels: {', '.join(self.labels)}); fix the label or add training examples"
                )
            ids.append(index[name])
        return ids

    def load_splits(self, tokenizer: Any) -> Splits:
        """Read train/validation/test per the config, fix the label set, tokenize."""
        d, seed = self.config.data, self.config.seed
        if not d.train:
            raise DataError("no training data: set data.train=<file> (CSV, TSV, JSON, JSONL or Parquet)")
        train = self.read(d.train)
        if self.labels is None:
            self.labels = sort_labels({label_name(r[d.label_column]) for r in train.rows})
        if len(self.labels) < 2:
            raise DataError(
                f"{train.path}: column '{d.label_column}' has only one label "
                f"({self.labels[0]}); classification needs at least two"
            )
        if d.validation:
            validation = self.read(d.validation)
        else:
            keys = [label_name(r[d.label_column]) for r in train.rows]
            train, validation = stratified_split(train, keys, d.validation_split, seed)
        train = sample(train, d.max_train_samples, seed)
        validation = sample(validation, d.max_eval_samples, seed)
        test = sample(self.read(d.test), d.max_eval_samples, seed) if d.test else None
        return Splits(
            train=self.encode(train, tokenizer),
            validation=self.encode(validation, tokenizer),
            test=self.encode(test, tokenizer) if test is not None else None,
            files={
                k: v for k, v in (("train", d.train), ("validation", d.validation), ("test", d.test)) if v
            },
        )

    def encode(self, table: Table, tokenizer: Any, with_labels: bool = True) -> list[dict[str, Any]]:
        d = self.config.data
        texts = [str(r[d.text_column]) for r in table.rows]
        pairs = [str(r[d.text_pair_column]) for r in table.rows] if d.text_pair_column else None
        examples = encode_texts(tokenizer, texts, pairs, d.max_length)
        if with_labels:
            for example, label in zip(examples, self.label_ids(table)):
                example["labels"] = label
        return examples

    def encode_inputs(self, texts: list[str], tokenizer: Any, pairs: list[str] | None = None) -> list[dict]:
        return encode_texts(tokenizer, texts, pairs, self.config.data.max_length)

    # ----------------------------------------------------------------- model
    def build_model(self, path: str) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        labels = self.labels or []
        return AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
        )

    collate = staticmethod(collate_tokens)

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> int:
        """How many loss terms the batch adds: one per example."""
        return batch["labels"].numel()

    @staticmethod
    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy summed over the batch (the loop divides by the step's units)."""
        labels = batch.pop("labels")
        logits = model(**batch).logits
        return F.cross_entropy(logits.float(), labels, reduction="sum")

    # ----------------------------------------------------------------- outputs
    def metrics(self, logits: np.ndarray, examples: list[dict[str, Any]]) -> dict[str, Any]:
        y_true = np.array([e["labels"] for e in examples])
        return classification_metrics(y_true, logits.argmax(-1), self.labels or [])

    def predictions(self, logits: np.ndarray) -> list[dict[str, Any]]:
        probs = torch.softmax(torch.from_numpy(logits).float(), dim=-1).numpy()
        out = []
        for row in probs:
            best = int(row.argmax())
            out.append(
                {
                    "label": self.labels[best],
                    "score": float(row[best]),
                    "probabilities": {name: float(p) for name, p in zip(self.labels, row)},
                }
            )
        return out
