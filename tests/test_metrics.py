"""Classification metrics against hand-worked examples (scikit-learn's definitions, zero_division=0)."""

from __future__ import annotations

import numpy as np
import pytest

from tunelab.metrics import classification_metrics, confusion_matrix

LABELS = ["a", "b", "c"]


def test_hand_worked_three_classes():
    # true a (4 rows): predicted a, a, a, b
    # true b (2 rows): predicted b, c
    # true c (4 rows): predicted a, a, c, c
    y_true = [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
    y_pred = [0, 0, 0, 1, 1, 2, 0, 0, 2, 2]
    m = classification_metrics(np.array(y_true), np.array(y_pred), LABELS)

    # confusion matrix, rows true, columns predicted:
    #        a  b  c    support
    #   a [  3, 1, 0 ]  4
    #   b [  0, 1, 1 ]  2
    #   c [  2, 0, 2 ]  4
    #  predicted: 5  2  3
    assert m["confusion_matrix"] == {"labels": LABELS, "matrix": [[3, 1, 0], [0, 1, 1], [2, 0, 2]]}
    assert m["num_examples"] == 10
    # accuracy = (3 + 1 + 2) / 10
    assert m["accuracy"] == pytest.approx(0.6)

    # precision = tp / predicted: a 3/5, b 1/2, c 2/3
    # recall    = tp / support:   a 3/4, b 1/2, c 2/4
    # f1 = 2pr / (p + r):  a 2(3/5)(3/4) / (3/5 + 3/4) = (9/10) / (27/20) = 2/3
    #                      b 1/2
    #                      c 2(2/3)(1/2) / (2/3 + 1/2) = (2/3) / (7/6) = 4/7
    expected = {"a": (3 / 5, 3 / 4, 2 / 3, 4), "b": (1 / 2, 1 / 2, 1 / 2, 2), "c": (2 / 3, 1 / 2, 4 / 7, 4)}
    for name, (p, r, f1, support) in expected.items():
        got = m["per_class"][name]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p, r, f1)), name
        assert got["support"] == support

    # macro: plain means over the three classes
    #   precision (3/5 + 1/2 + 2/3) / 3 = (18 + 15 + 20) / 90 = 53/90
    #   recall    (3/4 + 1/2 + 1/2) / 3 = 7/12
    #   f1        (2/3 + 1/2 + 4/7) / 3 = (28 + 21 + 24) / 126 = 73/126
    assert m["precision_macro"] == pytest.approx(53 / 90)
    assert m["recall_macro"] == pytest.approx(7 / 12)
    assert m["f1_macro"] == pytest.approx(73 / 126)
    # micro: pooled counts; in single-label classification all three equal accuracy, 6/10
    assert m["precision_micro"] == pytest.approx(0.6)
    assert m["recall_micro"] == pytest.approx(0.6)
    assert m["f1_micro"] == pytest.approx(0.6)


def test_a_class_never_predicted_scores_zero_not_nan():
    # c is never predicted (precision 0/0 -> 0) and never right (recall 0/2 -> 0, f1 -> 0)
    y_true = [0, 1, 2, 2]
    y_pred = [0, 1, 1, 1]
    m = classification_metrics(y_true, y_pred, LABELS)
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    # b: precision 1/3, recall 1/1, f1 2(1/3)(1) / (4/3) = 1/2
    assert m["per_class"]["b"]["precision"] == pytest.approx(1 / 3)
    assert m["per_class"]["b"]["f1"] == pytest.approx(1 / 2)
    # macro f1 counts c's zero: (1 + 1/2 + 0) / 3
    assert m["f1_macro"] == pytest.approx(1 / 2)
    assert all(np.isfinite(v) for k, v in m.items() if isinstance(v, float))


def test_a_class_absent_from_both_sides_counts_zero_in_macro():
    # only a and b occur; c contributes zeros, as scikit-learn does when labels=[0, 1, 2]
    m = classification_metrics([0, 1], [0, 1], LABELS)
    assert m["accuracy"] == 1.0
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["f1_macro"] == pytest.approx(2 / 3)


def test_perfect_predictions():
    y = [2, 0, 1, 1, 0, 2]
    m = classification_metrics(y, y, LABELS)
    for key in (
        "accuracy",
        "precision_macro",
        "recall_macro",
        "f1_macro",
        "precision_micro",
        "recall_micro",
        "f1_micro",
    ):
        assert m[key] == 1.0, key
    assert m["confusion_matrix"]["matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]


def test_confusion_matrix_rows_are_true_columns_predicted():
    matrix = confusion_matrix(np.array([0, 0, 0]), np.array([2, 2, 1]), 3)
    assert matrix.tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 0]]
    m = classification_metrics([0], [1], ["a", "b"])
    assert m["confusion_matrix"]["matrix"] == [[0, 1], [0, 0]]  # true a, predicted b
    assert m["per_class"]["a"]["recall"] == 0.0 and m["per_class"]["a"]["support"] == 1


def test_no_examples():
    m = classification_metrics([], np.array([], dtype=np.int64), ["a", "b"])
    assert m["num_examples"] == 0 and m["accuracy"] == 0.0 and m["f1_macro"] == 0.0
    assert m["confusion_matrix"]["matrix"] == [[0, 0], [0, 0]]


def test_results_are_plain_python_numbers():
    m = classification_metrics(np.array([0, 1]), np.array([1, 1]), ["a", "b"])
    assert type(m["accuracy"]) is float and type(m["num_examples"]) is int
    assert type(m["per_class"]["a"]["support"]) is int
    assert all(type(v) is int for row in m["confusion_matrix"]["matrix"] for v in row)


def test_metric_direction_is_declared_once():
    from tunelab.metrics import higher_is_better

    for metric in ("loss", "eval_loss", "mse", "mae", "perplexity"):
        assert not higher_is_better(metric), metric
    for metric in ("accuracy", "f1_micro", "f1_macro", "r2", "pearson", "spearman", "subset_accuracy"):
        assert higher_is_better(metric), metric


def test_the_metric_names_the_config_accepts_are_the_ones_each_task_scores():
    """`train.metric_for_best` is checked at load against TASK_METRICS: every name there must
    be a number the task's metrics really return at validation."""
    from tunelab.config import load_config
    from tunelab.metrics import (
        MULTI_LABEL_METRICS,
        TASK_METRICS,
        entity_metrics,
        multilabel_metrics,
        regression_metrics,
        squad_metrics,
    )
    from tunelab.tasks.causal_lm import CausalLMTask
    from tunelab.tasks.masked_lm import MaskedLMTask
    from tunelab.tasks.preference import PreferenceTask
    from tunelab.tasks.seq2seq import Seq2SeqTask

    scored = {
        "classification": classification_metrics(np.array([0, 1]), np.array([0, 0]), ["a", "b"]),
        "regression": regression_metrics([0.5, 1.0], np.array([0.4, 1.2])),
        "token-classification": entity_metrics([["B-PER", "O"]], [["B-PER", "O"]]),
        "causal-lm": CausalLMTask(load_config(task="causal-lm")).metrics([np.array([2.0, 4.0])], []),
        "seq2seq": Seq2SeqTask(load_config(task="seq2seq")).metrics([np.array([2.0, 4.0])], []),
        "masked-lm": MaskedLMTask(load_config(task="masked-lm")).metrics([np.array([2.0, 4.0, 1.0])], []),
        "question-answering": squad_metrics([["Paris"]], ["Paris"], version_2=True),
        # one pair: policy chosen, rejected; reference chosen, rejected; token counts
        "preference": PreferenceTask(load_config(task="preference")).metrics(
            [np.array([-2.0, -3.0, -2.5, -2.5, 2.0, 2.0])], []
        ),
    }
    assert set(scored) == set(TASK_METRICS)
    for task, names in TASK_METRICS.items():
        for name in names:
            assert isinstance(scored[task].get(name), float), (task, name)
    multi = multilabel_metrics(
        np.array([[1, 0]], dtype=bool), np.array([[1, 1]], dtype=bool), ["a", "b"], 0.5
    )
    assert all(isinstance(multi.get(name), float) for name in MULTI_LABEL_METRICS)
