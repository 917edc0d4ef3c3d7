"""Task metrics computed from predictions and references.

Classification metrics are a few lines of counting over a confusion matrix; they are written
here with numpy rather than pulling in scikit-learn (and scipy) as a hard dependency. The
definitions match scikit-learn's (`zero_division=0`); tests check them on hand-worked cases.
Generation metrics use the reference implementations: sacrebleu (BLEU) and rouge-score.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any

import numpy as np

# Which way each metric improves is declared here once: these fall as a model gets better
# (and so does any `*loss`); every other metric rises.
LOWER_IS_BETTER = ("loss", "mse", "mae", "perplexity")

# The validation metrics each task scores during training (`train.metric_for_best` picks one).
CLASSIFICATION_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_micro",
                          "recall_micro", "f1_micro")  # fmt: skip
MULTI_LABEL_METRICS = ("subset_accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_micro",
                       "recall_micro", "f1_micro")  # fmt: skip
TASK_METRICS = {
    "classification": CLASSIFICATION_METRICS,
    "regression": ("mse", "mae", "r2", "pearson", "spearman"),
    "token-classification": ("f1_micro", "precision_micro", "recall_micro", "f1_macro", "accuracy"),
    "causal-lm": ("loss", "perplexity"),
    "seq2seq": ("loss", "perplexity"),
    "masked-lm": ("loss", "perplexity", "accuracy"),
    "question-answering": ("f1", "exact_match"),
    "preference": ("reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected"),
}


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of `metric` means a better model."""
    return not (metric.endswith("loss") or metric in LOWER_IS_BETTER)


def task_metrics(task: str, multi_label: bool = False) -> tuple[str, ...]:
    """The names `train.metric_for_best` may take for `task`."""
    return MULTI_LABEL_METRICS if task == "classification" and multi_label else TASK_METRICS[task]


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> np.ndarray:
    """Rows are true labels, columns predicted labels."""
    matrix = np.zeros((num_labels, num_labels), dtype=np.int64)
    # int64: an empty list would otherwise become a float array, which cannot index
    np.add.at(matrix, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return matrix


def _ratio(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _per_class(labels: list[str], precision: Any, recall: Any, f1: Any, support: Any) -> dict[str, Any]:
    return {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
               "support": int(support[i])}
        for i, name in enumerate(labels)
    }  # fmt: skip


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
        "per_class": _per_class(labels, precision, recall, f1, support),
        "confusion_matrix": {"labels": list(labels), "matrix": matrix.tolist()},
    }


def multilabel_metrics(y_true: Any, y_pred: Any, labels: list[str], threshold: float) -> dict[str, Any]:
    """Multi-label scores from boolean (examples, labels) matrices: micro- and macro-averaged
    precision, recall and F1, subset accuracy (every label right), per-label scores."""
    y_true, y_pred = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    tp = (y_true & y_pred).sum(axis=0).astype(np.float64)
    predicted, support = y_pred.sum(axis=0), y_true.sum(axis=0)
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    micro_p, micro_r = float(_ratio(tp.sum(), predicted.sum())), float(_ratio(tp.sum(), support.sum()))
    return {
        "f1_micro": float(_ratio(2 * micro_p * micro_r, micro_p + micro_r)),
        "precision_micro": micro_p,
        "recall_micro": micro_r,
        "f1_macro": float(f1.mean()) if len(labels) else 0.0,
        "precision_macro": float(precision.mean()) if len(labels) else 0.0,
        "recall_macro": float(recall.mean()) if len(labels) else 0.0,
        "subset_accuracy": float((y_true == y_pred).all(axis=1).mean()) if len(y_true) else 0.0,
        "threshold": threshold,
        "num_examples": int(len(y_true)),
        "per_class": _per_class(labels, precision, recall, f1, support),
    }


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks starting at 1, ties given their average rank (as Spearman's rho needs)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0
            start = end
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def regression_metrics(y_true: Any, y_pred: Any) -> dict[str, Any]:
    """MSE, MAE, R² (1 - SSE/SST), Pearson's r and Spearman's rho."""
    y_true, y_pred = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    error = y_pred - y_true
    total = ((y_true - y_true.mean()) ** 2).sum() if len(y_true) else 0.0
    return {
        "mse": float((error**2).mean()) if len(y_true) else 0.0,
        "mae": float(np.abs(error).mean()) if len(y_true) else 0.0,
        "r2": float(1.0 - (error**2).sum() / total) if total > 0 else 0.0,
        "pearson": _pearson(y_true, y_pred) if len(y_true) > 1 else 0.0,
        "spearman": _pearson(_ranks(y_true), _ranks(y_pred)) if len(y_true) > 1 else 0.0,
        "num_examples": int(len(y_true)),
    }


def _split_tag(tag: str) -> tuple[str, str]:
    if tag == "O" or not tag:
        return "O", ""
    if len(tag) > 1 and tag[1] in "-_" and tag[0] in "BIESLU":
        prefix = {"L": "E", "U": "S"}.get(tag[0], tag[0])
        return prefix, tag[2:]
    return "I", tag  # a bare type counts as inside an entity of that type


def get_entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """Entity chunks as (type, first word, last word) from BIO/IOB2/BIOES tags, following
    conlleval's chunk rules (as seqeval does by default): an I- after O or after another type
    starts a new entity."""
    entities = []
    prev_prefix, prev_type, begin = "O", "", 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, kind = _split_tag(tag)
        ends = prev_prefix != "O" and (
            prev_prefix in "ES" or (prev_prefix in "BI" and prefix in "BSO") or prev_type != kind
        )
        if ends:
            entities.append((prev_type, begin, i - 1))
        starts = prefix != "O" and (prefix in "BS" or prev_prefix in "ESO" or prev_type != kind)
        if starts:
            begin = i
        prev_prefix, prev_type = prefix, kind
    return entities


def entity_metrics(truth: list[list[str]], predicted: list[list[str]]) -> dict[str, Any]:
    """Entity-level precision, recall and F1 per type and micro/macro-averaged, where an entity
    counts only if its type and both boundaries match (conlleval / seqeval default)."""
    true_set, pred_set = set(), set()
    for n, (t, q) in enumerate(zip(truth, predicted)):
        true_set |= {(n, *e) for e in get_entities(t)}
        pred_set |= {(n, *e) for e in get_entities(q)}
    types = sorted({e[1] for e in true_set | pred_set})
    per_type = {}
    for kind in types:
        tp = len({e for e in true_set & pred_set if e[1] == kind})
        n_pred = sum(1 for e in pred_set if e[1] == kind)
        n_true = sum(1 for e in true_set if e[1] == kind)
        p, r = float(_ratio(tp, n_pred)), float(_ratio(tp, n_true))
        per_type[kind] = {
            "precision": p,
            "recall": r,
            "f1": float(_ratio(2 * p * r, p + r)),
            "support": n_true,
        }
    tp = len(true_set & pred_set)
    p, r = float(_ratio(tp, len(pred_set))), float(_ratio(tp, len(true_set)))
    words = sum(len(t) for t in truth)
    correct = sum(a == b for t, q in zip(truth, predicted) for a, b in zip(t, q))
    return {
        "f1_micro": float(_ratio(2 * p * r, p + r)),
        "precision_micro": p,
        "recall_micro": r,
        "f1_macro": float(np.mean([s["f1"] for s in per_type.values()])) if per_type else 0.0,
        "accuracy": float(_ratio(correct, words)),
        "num_examples": len(truth),
        "num_entities": len(true_set),
        "per_class": per_type,
    }


# ------------------------------------------------------------------------ generation

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


def _has_cjk(texts: list[str]) -> bool:
    return any(_CJK.search(t) for t in texts)


class _RougeTokens:
    """ROUGE tokens: lower-cased words, with every CJK character a token of its own
    (rouge-score's default tokenizer drops all non-ASCII text, so Chinese would score 0)."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]|\w+",
                          text.lower())  # fmt: skip


def normalize_answer(text: str) -> str:
    """For exact match: lower case, no surrounding punctuation, single spaces."""
    return " ".join(text.lower().strip().strip(".!?,;:'\"").split())


def generation_metrics(references: list[str], predictions: list[str]) -> dict[str, Any]:
    """Corpus BLEU (sacrebleu, 0-100; its `zh` tokenizer when the references hold CJK text),
    ROUGE-1/2/L F1 (rouge-score, 0-1, averaged over rows) and exact match (0-1)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if not references:
        return {}
    tokenize = "zh" if _has_cjk(references) else "13a"
    bleu = sacrebleu.corpus_bleu(predictions, [references], tokenize=tokenize).score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_RougeTokens())
    scores = [scorer.score(r, p) for r, p in zip(references, predictions)]
    out = {"bleu": float(bleu)}
    for key in ("rouge1", "rouge2", "rougeL"):
        out[key] = float(np.mean([s[key].fmeasure for s in scores]))
    out["exact_match"] = float(np.mean([normalize_answer(r) == normalize_answer(p)
                                        for r, p in zip(references, predictions)]))  # fmt: skip
    out["generated"] = len(references)
    return out


# ------------------------------------------------------------------------ extractive QA
# Written out from the official SQuAD evaluation scripts (evaluate-v1.1.py, evaluate-v2.0.py):
# they are single files, not packages, and the scores must match them to the digit.

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def squad_normalize(text: str) -> str:
    """The official normalisation: lower case, punctuation out, articles (a, an, the) out,
    whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact(gold: str, prediction: str) -> int:
    return int(squad_normalize(gold) == squad_normalize(prediction))


def squad_f1(gold: str, prediction: str, version_2: bool = True) -> float:
    """Token-overlap F1 of the normalised answers. v2.0: when either side is empty (no answer),
    1 if both are, else 0; v1.1 scores an empty side 0."""
    gold_tokens, pred_tokens = squad_normalize(gold).split(), squad_normalize(prediction).split()
    if version_2 and (not gold_tokens or not pred_tokens):
        return float(gold_tokens == pred_tokens)
    same = sum((Counter(gold_tokens) & Counter(pred_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(golds: list[list[str]], predictions: list[str], version_2: bool) -> dict[str, Any]:
    """Exact match and F1 (0-1), each the max over a question's gold answers, averaged over
    questions, as the official scripts compute them. v2.0: gold answers that normalise to
    nothing are dropped, and a question left with none (unanswerable) has the empty string as
    its one gold answer, so only an empty prediction scores; adds HasAns_/NoAns_ figures."""
    exact, f1, answerable = [], [], []
    for answers, prediction in zip(golds, predictions):
        if version_2:
            answers = [a for a in answers if squad_normalize(a)] or [""]
        answerable.append(answers != [""])
        exact.append(max(squad_exact(a, prediction) for a in answers))
        f1.append(max(squad_f1(a, prediction, version_2) for a in answers))
    out: dict[str, Any] = {"exact_match": _mean(exact), "f1": _mean(f1), "total": len(exact)}
    if version_2:
        for prefix, keep in (("HasAns", True), ("NoAns", False)):
            rows = [i for i, a in enumerate(answerable) if a == keep]
            if rows:
                out[f"{prefix}_exact"] = _mean([exact[i] for i in rows])
                out[f"{prefix}_f1"] = _mean([f1[i] for i in rows])
            out[f"{prefix}_total"] = len(rows)
    return out


def _mean(values: list[Any]) -> float:
    return float(np.mean(values)) if values else 0.0
