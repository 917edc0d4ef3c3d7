"""Text classification: text (+ optional text pair) -> one label, or a set of labels.

Single-label: cross-entropy; accuracy, precision/recall/F1 (macro, micro, per class) and the
confusion matrix. Multi-label (`classification.multi_label`, a list-valued label column, or
several 0/1 `data.label_columns`): binary cross-entropy per label; micro/macro F1, subset
accuracy, with a decision threshold that is fixed by the user or tuned on validation.
Models: any `AutoModelForSequenceClassification` (encoder or decoder).
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tunelab.augment import augment_table
from tunelab.config import Config, max_length
from tunelab.data import Table, is_missing, read_table, require_columns, shots, shown, shown_list
from tunelab.errors import DataError
from tunelab.metrics import classification_metrics, multilabel_metrics
from tunelab.tasks.arrow_splits import cached_classification_splits
from tunelab.tasks.base import Splits, TaskBase, collate_tokens, encode_splits, encode_texts, split_tables


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


# cells that spreadsheets and pandas write for "no value": never a class unless data.labels names them
MISSING_MARKERS = {"nan", "na", "n/a", "null", "none", "nil", "#n/a"}


def looks_numeric(names: list[str]) -> bool:
    """Labels that are all numbers, some with a fraction or too many to be classes: a
    regression target read as classes."""
    try:
        values = [float(n) for n in names]
    except ValueError:
        return False
    return len(values) > 10 and (any(not v.is_integer() for v in values) or len(values) > 50)


def _flag(value: Any) -> bool | None:
    """A 0/1 cell of a multi-label column: True, False, or None when it is neither."""
    text = label_name(value).lower()
    return {"1": True, "true": True, "0": False, "false": False, "": False}.get(text)


class ClassificationTask(TaskBase):
    name = "classification"
    # the task head: HF names of the fresh classifier, plus the pretrained pooler of BERT-style
    # encoders, which feeds only the head and so trains with it
    head_modules: tuple[str, ...] = ("classifier", "score", "pooler")
    peft_task_type = "SEQ_CLS"

    def __init__(self, config: Config, labels: list[str] | None = None):
        self.config = config
        self.labels = labels or config.data.labels
        self.multi_label = config.classification.multi_label or bool(config.data.label_columns)
        self.default_metric = "f1_micro" if self.multi_label else "accuracy"
        # where the label set came from, for the message on a label outside it: "run" (a
        # finished run's labels), "data.labels" or "train" (fixed by `load_tables`)
        self.labels_from = "run"

    # ----------------------------------------------------------------- data
    def _column_keys(self) -> dict[str, str]:
        d = self.config.data
        keys = {d.text_column: "data.text_column"}
        if d.text_pair_column:
            keys[d.text_pair_column] = "data.text_pair_column"
        for column in d.label_columns or [d.label_column]:
            keys[column] = "data.label_columns" if d.label_columns else "data.label_column"
        return keys

    def _text_columns(self) -> list[str]:
        d = self.config.data
        return [d.text_column] + ([d.text_pair_column] if d.text_pair_column else [])

    def read(self, path: str, need_labels: bool = True) -> Table:
        """Read and check a file: columns exist, texts non-empty, labels present."""
        table = read_table(path, self.config.data.format)
        self.check(table, need_labels)
        return table

    def check(self, table: Table, need_labels: bool = True) -> list[list[str]]:
        """Check a table (a whole file, or a chunk of one): columns exist, texts non-empty,
        labels present; returns each row's label names (none without `need_labels`)."""
        keys = self._column_keys()
        require_columns(table, [c for c in keys if need_labels or c in self._text_columns()], keys,
                        self.column_flags)  # fmt: skip
        names = []
        for i, row in enumerate(table.rows):
            for column in self._text_columns():
                if is_missing(row.get(column)):
                    raise DataError(
                        f"{table.where(i)}: column '{column}' is empty; fill in the text or remove the row"
                    )
            if need_labels:
                names.append(self.row_labels(table, i))  # raises on a missing or malformed label
        return names

    def row_labels(self, table: Table, i: int) -> list[str]:
        """The label names of row i: one for single-label, any number for multi-label."""
        d, row = self.config.data, table.rows[i]
        if d.label_columns:
            flags = {c: _flag(row.get(c)) for c in d.label_columns}
            bad = [c for c, f in flags.items() if f is None]
            if bad:
                raise DataError(
                    f"{table.where(i)}: column '{bad[0]}' must be 0 or 1, got {row.get(bad[0])!r}"
                )
            return [c for c, f in flags.items() if f]
        value = row.get(d.label_column)
        if (
            isinstance(value, str)
            and value.strip().lower() in MISSING_MARKERS
            and value.strip() not in (self.labels or [])
        ):
            raise DataError(
                f"{table.where(i)}: column '{d.label_column}' holds {value.strip()!r}, a missing value, not a "
                f"label; {'leave the cell empty for no labels' if self.multi_label else 'fill it in'} or remove "
                f"the row (if '{value.strip()}' is a real class, list it in data.labels)"
            )
        if not self.multi_label:
            if is_missing(value):
                raise DataError(
                    f"{table.where(i)}: column '{d.label_column}' has no label; fill it in or remove the row"
                )
            return [label_name(value)]
        if value is None or (isinstance(value, float) and np.isnan(value)):
            raise DataError(
                f"{table.where(i)}: column '{d.label_column}' has no labels; write an empty list "
                f"[] (or an empty cell in CSV) for a row with none"
            )
        parts = value if isinstance(value, (list, tuple)) else str(value).split(d.label_separator)
        return [name for name in (label_name(p) for p in parts) if name]

    def _all_labels(self, table: Table) -> list[list[str]]:
        return [self.row_labels(table, i) for i in range(len(table))]

    def label_ids(self, table: Table) -> list[Any]:
        """Each row's label id (single-label) or multi-hot vector (multi-label); a label unseen
        in training is an error."""
        assert self.labels is not None  # fixed by load_tables (or given) before rows are encoded
        index = {name: i for i, name in enumerate(self.labels)}
        out: list[Any] = []
        for i, names in enumerate(self._all_labels(table)):
            for name in names:
                if name not in index:
                    raise DataError(f"{table.where(i)}: label '{shown(name)}' {self._outside()}")
            if self.multi_label:
                vector = [0.0] * len(self.labels)
                for name in names:
                    vector[index[name]] = 1.0
                out.append(vector)
            else:
                out.append(index[names[0]])
        return out

    def _outside(self) -> str:
        """Why a label is not known, and the fix, by where the label set came from."""
        known = shown_list(self.labels or [])
        if self.labels_from == "data.labels":
            return (f"is not in data.labels ({known}); add it to data.labels or fix the label "
                    f"in the file")  # fmt: skip
        if self.labels_from == "train":
            return (f"never appears in the training data (known labels: {known}); fix the label "
                    f"or add training examples")  # fmt: skip
        return f"is not one of the labels this run was trained on ({known}); fix the label in the file"

    def load_tables(self) -> tuple[Table, Table, Table | None]:
        """Read train/validation/test per the config and fix the label set; the rows that
        training uses (the no-training baselines of `compare` read them too)."""
        d, seed = self.config.data, self.config.seed
        if not d.train:
            raise DataError("no training data: set data.train=<file> (CSV, TSV, JSON, JSONL or Parquet)")
        self.labels_from = "train" if self.labels is None else "data.labels"
        train = self.read(d.train)
        self.fix_labels(train.path, {name for names in self._all_labels(train) for name in names})

        def few_shot(table: Table) -> Table:
            if not d.shots_per_class:
                return table
            return shots(table, self.strata(table), d.shots_per_class, seed)

        return split_tables(self, train, self.strata(train), few_shot)

    def fix_labels(self, path: Path, seen: set[str]) -> None:
        """Fix the label set from the names `seen` in the training file `path`, unless data.labels
        gave it; refuse numbers that look like a regression target, and a single class."""
        d = self.config.data
        if self.labels is None:
            self.labels = list(d.label_columns) if d.label_columns else sort_labels(seen)
            if self.name == "classification" and not d.label_columns and looks_numeric(self.labels):
                raise DataError(
                    f"{path}: column '{d.label_column}' has {len(self.labels)} distinct numbers "
                    f"({shown_list(self.labels[:3])}, ...): for a numeric target set task=regression "
                    f"(to keep them as classes, list them in data.labels)"
                )
        if len(self.labels) < 2 and not self.multi_label and self.name == "classification":
            raise DataError(
                f"{path}: column '{d.label_column}' has only one label "
                f"({shown(self.labels[0])}); classification needs at least two"
            )

    def load_splits(self, tokenizer: Any) -> Splits:
        """Read train/validation/test per the config, fix the label set, tokenize. With
        `data.cache` (the default), the encoded splits come from (or go to) the Arrow cache and
        the files are read in chunks (`arrow_splits`)."""
        if self.config.data.cache:
            return cached_classification_splits(self, tokenizer)
        return encode_splits(self, self.load_tables(), tokenizer, self.augment)

    def label_of(self, names: list[str]) -> Any:
        """The encoded label of a row's label names (all known): an id, or a multi-hot vector."""
        assert self.labels is not None
        if not self.multi_label:
            return self.labels.index(names[0])
        vector = [0.0] * len(self.labels)
        for name in names:
            vector[self.labels.index(name)] = 1.0
        return vector

    def strata(self, table: Table) -> list[Hashable]:
        """What splits and few-shot sampling keep balanced: each row's label set."""
        return ["|".join(sorted(names)) for names in self._all_labels(table)]

    def augment(self, table: Table) -> Table:
        """Training rows plus augmented copies when `data.augment.method` asks for them."""
        options = self.config.data.augment
        if options.method == "none":
            return table

        return augment_table(table, self.config)

    def encode(self, table: Table, tokenizer: Any, with_labels: bool = True) -> list[dict[str, Any]]:
        d = self.config.data
        texts = [str(r[d.text_column]) for r in table.rows]
        pairs = [str(r[d.text_pair_column]) for r in table.rows] if d.text_pair_column else None
        examples = encode_texts(tokenizer, texts, pairs, max_length(self.config))
        if with_labels:
            for example, label in zip(examples, self.label_ids(table)):
                example["labels"] = label
        return examples

    def encode_inputs(self, texts: list[str], tokenizer: Any, pairs: list[str] | None = None) -> list[dict]:
        return encode_texts(tokenizer, texts, pairs, max_length(self.config))

    # ----------------------------------------------------------------- model
    def build_model(self, path: str) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        labels = self.labels or []
        return AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
            problem_type="multi_label_classification" if self.multi_label else "single_label_classification",
            **self.pretrained_options(),
        )

    @property
    def pad_multiple(self) -> int:
        return self.config.data.pad_to_multiple_of

    def collate(self, examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        return collate_tokens(examples, pad_id, self.pad_multiple)

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> int:
        """How many loss terms the batch adds: one per example."""
        return batch["labels"].shape[0]

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed over the batch (the loop divides by the step's units): cross-entropy, or for
        multi-label the per-label binary cross-entropy averaged over labels."""
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / labels.shape[1]
        return F.cross_entropy(logits, labels, reduction="sum")

    # ----------------------------------------------------------------- outputs
    @property
    def threshold(self) -> float:
        value = self.config.classification.threshold
        return 0.5 if value is None else value

    def metrics(self, outputs: list[np.ndarray], examples: list[dict[str, Any]]) -> dict[str, Any]:
        logits = np.stack(outputs)
        if self.multi_label:
            y_true = np.array([e["labels"] for e in examples], dtype=bool)
            return multilabel_metrics(y_true, _sigmoid(logits) >= self.threshold, self.labels or [],
                                      self.threshold)  # fmt: skip
        y_true = np.array([e["labels"] for e in examples])
        return classification_metrics(y_true, logits.argmax(-1), self.labels or [])

    def calibrate(self, outputs: list[np.ndarray], examples: list[dict[str, Any]]) -> dict[str, Any]:
        """After training, tune the multi-label threshold on validation (micro-F1) unless the
        user fixed it; returns what was decided (saved in the run's config)."""
        if not self.multi_label or self.config.classification.threshold is not None or not examples:
            return {}
        probs = _sigmoid(np.stack(outputs))
        y_true = np.array([e["labels"] for e in examples], dtype=bool)
        grid = np.round(np.arange(0.05, 0.951, 0.05), 2)
        scores = [
            multilabel_metrics(y_true, probs >= t, self.labels or [], float(t))["f1_micro"] for t in grid
        ]
        self.config.classification.threshold = float(grid[int(np.argmax(scores))])
        return {"threshold": self.config.classification.threshold, "validation_f1_micro": max(scores)}

    def predictions(self, outputs: list[np.ndarray], examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        assert self.labels is not None  # fixed by load_tables (or the saved run) before predicting
        logits = np.stack(outputs)
        if self.multi_label:
            probs = _sigmoid(logits)
            return [
                {"labels": [n for n, p in zip(self.labels, row) if p >= self.threshold],
                 "probabilities": {n: float(p) for n, p in zip(self.labels, row)}}
                for row in probs
            ]  # fmt: skip
        probs = torch.softmax(torch.from_numpy(logits).float(), dim=-1).numpy()
        out = []
        for row in probs:
            best = int(row.argmax())
            out.append({"label": self.labels[best], "score": float(row[best]),
                        "probabilities": {name: float(p) for name, p in zip(self.labels, row)}})  # fmt: skip
        return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))
