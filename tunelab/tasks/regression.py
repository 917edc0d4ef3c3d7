"""Regression: text (+ optional text pair) -> one number.

The classification task's reading and encoding with a numeric label, a one-output head
(`AutoModelForSequenceClassification` with `num_labels=1`), mean squared error; MSE, MAE,
R², Pearson and Spearman.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tunelab.config import Config
from tunelab.data import Table, is_missing
from tunelab.errors import DataError
from tunelab.metrics import regression_metrics
from tunelab.tasks.classification import ClassificationTask


class RegressionTask(ClassificationTask):
    name = "regression"

    def __init__(self, config: Config, labels: list[str] | None = None):
        super().__init__(config, labels)
        self.multi_label = False
        self.default_metric = "mse"
        self.labels = ["value"]

    def row_labels(self, table: Table, i: int) -> list[str]:
        column = self.config.data.label_column
        value: Any = table.rows[i].get(column)  # any cell: what is not a number is reported below
        if is_missing(value):
            raise DataError(f"{table.where(i)}: column '{column}' has no value; fill it in or remove the row")
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise DataError(f"{table.where(i)}: column '{column}' must be a number, got {value!r}")
        return [str(number)]

    def label_ids(self, table: Table) -> list[Any]:
        return [float(self.row_labels(table, i)[0]) for i in range(len(table))]

    def label_of(self, names: list[str]) -> Any:
        return float(names[0])

    def strata(self, table: Table) -> list[Hashable]:
        """No classes here: splits keep the share of each value quintile instead."""
        values = np.array(self.label_ids(table))
        edges = np.quantile(values, [0.2, 0.4, 0.6, 0.8]) if len(values) else []
        return [int(k) for k in np.searchsorted(edges, values)]

    def build_model(self, path: str) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, problem_type="regression", **self.pretrained_options()
        )

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch.pop("labels").float()
        return F.mse_loss(model(**batch).logits.float().squeeze(-1), labels, reduction="sum")

    def metrics(self, outputs: list[np.ndarray], examples: list[dict[str, Any]]) -> dict[str, Any]:
        return regression_metrics([e["labels"] for e in examples], np.stack(outputs)[:, 0])

    def calibrate(self, outputs: list[np.ndarray], examples: list[dict[str, Any]]) -> dict[str, Any]:
        return {}

    def predictions(self, outputs: list[np.ndarray], examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"value": float(row[0])} for row in outputs]
