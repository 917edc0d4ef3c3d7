"""Task metrics computed from predictions and references.

Classification metrics are a few lines of counting over a confusion matrix; they are written
here with numpy rather than pulling in scikit-learn (and scipy) as a hard dependency. The
definitions match scikit-learn's (`zero_division=0`); tests check them on hand-worked cases.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> np.ndarray:
    """Rows are true labels, columns predicted labels."""
    matrix = np.zeros((num_labels, num_labels), dtype=np.int64)
    # int64: an empty list would otherwise become a float array, which cannot index
    np.add.at(matrix, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return matrix


def _ratio(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def classification_metrics(y_true: Any, y_pred: Any, labels: list[str]) -> dict[str, Any]:
    """Accuracy; precision, recall and F1 macro- and micro-averaged and per class; the
    confusion matrix. Classes with no support and no predictions count 0 in macro averages,
    as in scikit-learn with zero_division=0."""
    matrix = confusion_matrix(y_true, y_pred, len(labels))
    tp = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0)
    support = matrix.sum(axis=1)
    precision = _ratio(tp, predicted)
    recall = _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    total = matrix.sum()
    micro_p = float(_ratio(tp.sum(), predicted.sum()))
    micro_r = float(_ratio(tp.sum(), support.sum()))
    return {
        "accuracy": float(_ratio(tp.sum(), total)),
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "precision_micro": micro_p,
        "recall_micro": micro_r,
        "f1_micro": float(_ratio(2 * micro_p * micro_r, micro_p + micro_r)),
        "num_examples": int(total),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(labels)
        },
        "confusion_matrix": {"labels": list(labels), "matrix": matrix.tolist()},
    }
