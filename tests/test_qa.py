"""Extractive question answering: SQuAD JSON and flat rows, the row-numbered data errors,
windows over long contexts, span postprocessing and the v2 no-answer threshold, training
end to end with every method, predict (spans that slice the context exactly) and serve."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tunelab.config import load_config
from tunelab.errors import ConfigError, DataError
from tunelab.methods import METHODS
from tunelab.models import load_tokenizer
from tunelab.run import load, train
from tunelab.tasks import TASKS

from .conftest import write_tiny_bert

NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
CITIES = ["paris", "rome", "oslo", "lima", "cairo", "delhi", "quito", "seoul"]
WORDS = (
    NAMES
    + CITIES
    + ["lives", "in", "works", "there", "where", "does", "live", "near", "park", "with", "friends"]
)


@pytest.fixture(scope="module")
def qa_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("qa-bert"), extra_words=WORDS)


def qa_rows(n: int, seed: int, unanswerable: float = 0.3, filler: int = 0) -> list[dict]:
    """'<name> lives in <city> ...': the question asks where a person lives; for a share of
    rows it asks about someone the context does not mention (no answer)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        name, other = rng.sample(NAMES, 2)
        city = rng.choice(CITIES)
        before = " ".join(f"{rng.choice(NAMES)} works near the park ." for _ in range(filler))
        context = f"{before} {name} lives in {city} with friends .".strip()
        asked = other if rng.random() < unanswerable else name
        start = context.index(f" {city} ") + 1 if asked == name else None
        rows.append({"id": f"q{seed}-{i}", "question": f"where does {asked} live ?", "context": context,
                     "answers": {"text": [city] if start is not None else [],
                                 "answer_start": [start] if start is not None else []}})  # fmt: skip
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_squad(path: Path, rows: list[dict], version: str = "v2.0") -> Path:
    paragraphs = [{"context": r["context"], "qas": [{
        "id": r["id"], "question": r["question"], "is_impossible": not r["answers"]["text"],
        "answers": [{"text": t, "answer_start": s} for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])],
    }]} for r in rows]  # fmt: skip
    path.write_text(json.dumps({"version": version, "data": [{"title": "people", "paragraphs": paragraphs}]}))
    return path


def task_for(**overrides) -> object:
    config = load_config(task="question-answering", **overrides)
    return TASKS["question-answering"](config)


def settings(qa_bert: Path, tmp_path: Path, **extra) -> dict:
    return {"model": str(qa_bert), "task": "question-answering", "method": "full", "output_dir": str(tmp_path / "run"),
            "data.max_length": 48, "data.doc_stride": 16, "train.batch_size": 8, "train.precision": "fp32",
            "train.progress_bar": False, **extra}  # fmt: skip


# ------------------------------------------------------------------------- reading


def test_squad_json_and_flat_rows_read_alike(tmp_path):
    rows = qa_rows(12, seed=1)
    squad = task_for().read(str(write_squad(tmp_path / "s.json", rows)))
    flat = task_for().read(str(write_jsonl(tmp_path / "s.jsonl", rows)))
    assert [r["question"] for r in squad.rows] == [r["question"] for r in flat.rows]
    assert [r["answers"] for r in squad.rows] == [r["answers"] for r in flat.rows]
    for source, row in zip(rows, squad.rows):
        assert row["answers"] == list(zip(source["answers"]["text"], source["answers"]["answer_start"]))
    assert any(not r["answers"] for r in squad.rows)  # v2: unanswerable questions have none
    assert "data[0].paragraphs[3].qas[0]" in squad.where(3)


def test_csv_rows_hold_the_answers_as_json(tmp_path):
    rows = qa_rows(4, seed=2, unanswerable=0)
    path = tmp_path / "rows.csv"
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["question", "context", "answers"])
        writer.writeheader()
        for r in rows:
            writer.writerow(
                {"question": r["question"], "context": r["context"], "answers": json.dumps(r["answers"])}
            )
    table = task_for().read(str(path))
    assert [a[0][0] for a in (r["answers"] for r in table.rows)] == [r["answers"]["text"][0] for r in rows]


def bad_rows(tmp_path: Path, change) -> Path:
    rows = qa_rows(5, seed=3, unanswerable=0)
    change(rows[2])
    return write_jsonl(tmp_path / "bad.jsonl", rows)


def test_a_missing_context_names_the_row(tmp_path):
    path = bad_rows(tmp_path, lambda r: r.pop("context"))
    with pytest.raises(DataError, match=r"bad\.jsonl:3: 'context' is missing or empty"):
        task_for().read(str(path))


def test_an_answer_start_beyond_the_context_names_the_row(tmp_path):
    path = bad_rows(tmp_path, lambda r: r["answers"].update(answer_start=[500]))
    with pytest.raises(DataError, match=r"bad\.jsonl:3: answer_start 500 is beyond the context"):
        task_for().read(str(path))


def test_an_answer_not_at_its_start_is_an_error_unless_offsets_are_fixed(tmp_path):
    rows = qa_rows(5, seed=3, unanswerable=0)
    true_start = rows[2]["answers"]["answer_start"][0]
    path = bad_rows(
        tmp_path, lambda r: r["answers"].update(answer_start=[r["answers"]["answer_start"][0] - 3])
    )
    with pytest.raises(
        DataError, match=r"bad\.jsonl:3: answer '\w+' is not at answer_start .*data\.fix_offsets=true"
    ):
        task_for().read(str(path))
    fixed = task_for(**{"data.fix_offsets": True}).read(str(path))
    text, start = fixed.rows[2]["answers"][0]
    assert start == true_start and fixed.rows[2]["context"][start : start + len(text)] == text


def test_an_answer_text_found_nowhere_names_the_row(tmp_path):
    path = bad_rows(tmp_path, lambda r: r["answers"].update(text=["tokyo"]))
    with pytest.raises(DataError, match=r"bad\.jsonl:3: answer 'tokyo' is not found anywhere"):
        task_for(**{"data.fix_offsets": True}).read(str(path))


@pytest.mark.parametrize("content", [
    {"data": [{"title": "x", "text": "no paragraphs"}]},
    {"data": [{"paragraphs": [{"context": "c"}]}]},
    {"version": "v2.0"},
])  # fmt: skip
def test_a_json_file_that_is_not_squad_shaped(tmp_path, content):
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DataError, match=r"odd\.json: not SQuAD-shaped"):
        task_for().read(str(path))


def test_data_errors_stop_training_before_the_model_loads(qa_bert, tmp_path, monkeypatch):
    path = bad_rows(tmp_path, lambda r: r.pop("context"))
    built = []
    monkeypatch.setattr(TASKS["question-answering"], "build_model", lambda self, p: built.append(p))
    with pytest.raises(DataError, match="'context' is missing"):
        train(**settings(qa_bert, tmp_path, **{"data.train": str(path)}))
    assert not built and not (tmp_path / "run").exists()


def test_doc_stride_must_be_shorter_than_the_window(qa_bert, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", qa_rows(4, seed=1))
    with pytest.raises(ConfigError, match="data.doc_stride: 48 must be less than data.max_length"):
        task_for(**{"data.train": str(path), "data.max_length": 48, "data.doc_stride": 48}).load_splits(
            load_tokenizer(str(qa_bert))
        )


# ------------------------------------------------------------------------- windows and spans


def test_long_contexts_are_windowed_and_labels_point_at_the_answer(qa_bert, tmp_path):
    rows = qa_rows(6, seed=4, unanswerable=0, filler=8)  # ~50 context tokens: more than one window
    task = task_for(**{"data.max_length": 32, "data.doc_stride": 8})
    examples = task.encode(
        task.read(str(write_jsonl(tmp_path / "long.jsonl", rows))), load_tokenizer(str(qa_bert))
    )
    windows = {}
    for e in examples:
        windows.setdefault(e["row"], []).append(e)
        assert len(e["input_ids"]) <= 32
    assert all(len(w) > 1 for w in windows.values())
    for row, found in windows.items():
        answer = rows[row]["answers"]["text"][0]
        labelled = [e for e in found if e["labels"] != [0, 0]]
        assert labelled, "some window holds the answer"
        for e in labelled:
            start, end = e["labels"]
            assert e["context"][e["offsets"][start][0] : e["offsets"][end][1]] == answer
        for e in found:  # a window without the whole answer points at [CLS]
            inside = [o for o in e["offsets"] if o is not None]
            holds = inside[0][0] <= rows[row]["answers"]["answer_start"][0] and inside[-1][1] >= (
                rows[row]["answers"]["answer_start"][0] + len(answer)
            )
            assert (e["labels"] != [0, 0]) == holds


def fake_outputs(examples, spans, null=0.0):
    """Logits that favour token span (s, e) of each window, with `null` at [CLS]."""
    outputs = []
    for e, (s, t) in zip(examples, spans):
        logits = np.full((2, len(e["input_ids"])), -5.0)
        logits[:, 0] = null / 2
        logits[0, s], logits[1, t] = 4.0, 4.0
        outputs.append(logits)
    return outputs


def test_the_best_span_over_all_windows_maps_back_to_the_context(qa_bert, tmp_path):
    rows = qa_rows(1, seed=5, unanswerable=0, filler=8)
    task = task_for(**{"data.max_length": 32, "data.doc_stride": 8})
    examples = task.encode(
        task.read(str(write_jsonl(tmp_path / "one.jsonl", rows))), load_tokenizer(str(qa_bert))
    )
    spans = []
    for e in examples:  # every window favours its first context word, except the one with the answer
        first = next(i for i, o in enumerate(e["offsets"]) if o is not None)
        spans.append(tuple(e["labels"]) if e["labels"] != [0, 0] else (first, first))
    outputs = fake_outputs(examples, spans)
    labelled = next(i for i, e in enumerate(examples) if e["labels"] != [0, 0])
    outputs[labelled][0, spans[labelled][0]] += 1.0  # the answer's window scores highest
    outputs[labelled][1, spans[labelled][1]] += 1.0
    [prediction] = task.predictions(outputs, examples)
    answer = rows[0]["answers"]["text"][0]
    assert prediction["answer"] == answer
    assert rows[0]["context"][prediction["start"] : prediction["end"]] == answer
    assert task.metrics(outputs, examples)["exact_match"] == 1.0


def test_the_no_answer_threshold_is_tuned_on_validation(qa_bert, tmp_path):
    rows = qa_rows(40, seed=6, unanswerable=0.5)
    task = task_for(**{"data.max_length": 48, "data.doc_stride": 16})
    examples = task.encode(
        task.read(str(write_jsonl(tmp_path / "v.jsonl", rows))), load_tokenizer(str(qa_bert))
    )
    # answerable rows: the right span scores 8, no answer scores 5 (diff -3); unanswerable rows:
    # a wrong span scores 8 and no answer 10 (diff +2). Any threshold in [-3, 2) is perfect.
    spans, nulls = [], []
    for e in examples:
        if e["labels"] != [0, 0]:
            spans.append(tuple(e["labels"]))
            nulls.append(5.0)
        else:
            spans.append((next(i for i, o in enumerate(e["offsets"]) if o is not None),) * 2)
            nulls.append(10.0)
    outputs = [o for e, s, n in zip(examples, spans, nulls) for o in fake_outputs([e], [s], n)]
    assert task.config.qa.null_threshold is None
    decided = task.calibrate(outputs, examples)
    assert -3.0 <= decided["null_threshold"] < 2.0 and decided["validation_f1"] == 1.0
    assert task.config.qa.null_threshold == decided["null_threshold"]
    m = task.metrics(outputs, examples)
    assert m["f1"] == 1.0 and m["NoAns_exact"] == 1.0 and m["HasAns_exact"] == 1.0
    # a threshold above every difference answers every question: the unanswerable ones go wrong
    task.config.qa.null_threshold = 100.0
    assert task.metrics(outputs, examples)["NoAns_exact"] == 0.0


# ------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def qa_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("qa-data")
    return {"train": write_squad(folder / "train.json", qa_rows(160, seed=10)),
            "validation": write_jsonl(folder / "validation.jsonl", qa_rows(40, seed=11))}  # fmt: skip


@pytest.fixture(scope="module")
def qa_run(qa_bert, qa_files, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("qa-run")
    return train(**settings(qa_bert, out, **{"data.train": str(qa_files["train"]),
                                             "data.validation": str(qa_files["validation"]), "train.epochs": 12,
                                             "train.learning_rate": 3e-3, "full.train_embeddings": True}))  # fmt: skip


def test_training_learns_the_answers_and_reports_squad_metrics(qa_run):
    report = json.loads((qa_run.path / "eval.json").read_text())
    validation = report["validation"]
    for key in ("exact_match", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "total"):
        assert key in validation
    assert validation["total"] == 40
    assert validation["f1"] > 0.6, validation  # the pattern is simple: a tiny model learns it
    # the tuned no-answer threshold is stored in the run, so predict uses it
    saved = load_config(qa_run.path / "config.yaml")
    assert saved.qa.null_threshold == report["calibration"]["null_threshold"]


def test_predict_spans_slice_the_context_exactly(qa_run, qa_files, tmp_path):
    run = load(qa_run.path)
    rows = qa_rows(20, seed=12, unanswerable=0.5)
    results = run.predict([r["question"] for r in rows], [r["context"] for r in rows])
    assert len(results) == 20
    answered = 0
    for row, result in zip(rows, results):
        assert set(result) == {"answer", "start", "end", "score"} and 0.0 <= result["score"] <= 1.0
        if result["answer"] is not None:
            answered += 1
            assert row["context"][result["start"] : result["end"]] == result["answer"]
        else:
            assert result["start"] is None and result["end"] is None
    assert answered > 0
    run.config.qa.null_threshold = -1e9  # no answer beats any span: every question gets none
    assert all(r == {"answer": None, "start": None, "end": None, "score": r["score"]}
               for r in run.predict([r["question"] for r in rows], [r["context"] for r in rows]))  # fmt: skip
    run.config.qa.null_threshold = load_config(qa_run.path / "config.yaml").qa.null_threshold
    from_file = run.predict_file(write_jsonl(tmp_path / "ask.jsonl", [{"question": r["question"],
                                                                      "context": r["context"]} for r in rows]))  # fmt: skip
    assert [r["answer"] for r in from_file] == [r["answer"] for r in results]
    assert run.evaluate(qa_files["validation"])["f1"] == pytest.approx(
        json.loads((qa_run.path / "eval.json").read_text())["validation"]["f1"], abs=1e-6
    )


def test_cli_predict_with_question_and_context(qa_run):
    row = qa_rows(1, seed=13, unanswerable=0)[0]
    done = subprocess.run([sys.executable, "-m", "tunelab", "predict", str(qa_run.path), "--question", row["question"],
                           "--context", row["context"], "--json"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    if result["answer"] is not None:
        assert row["context"][result["start"] : result["end"]] == result["answer"]


def test_serve_answers_questions(qa_run):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from tunelab.serve import create_app

    row = qa_rows(1, seed=14, unanswerable=0)[0]
    with TestClient(create_app(load(qa_run.path))) as client:
        reply = client.post(
            "/v1/answer", json={"question": [row["question"]] * 2, "context": [row["context"]] * 2}
        )
        assert reply.status_code == 200, reply.text
        data = reply.json()["data"]
        assert len(data) == 2 and data[0]["answer"] == data[1]["answer"]
        if data[0]["answer"] is not None:
            assert row["context"][data[0]["start"] : data[0]["end"]] == data[0]["answer"]
        assert client.post("/v1/answer", json={"question": ["a", "b"], "context": ["c"]}).status_code == 400
        assert client.post("/v1/classify", json={"input": "x"}).status_code == 404


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_question_answering(method, qa_bert, qa_files, tmp_path):
    run = train(**settings(qa_bert, tmp_path, method=method, **{
        "data.train": str(qa_files["validation"]), "train.max_steps": 2, "data.max_eval_samples": 8,
        "prefix.num_virtual_tokens": 4, "prompt.num_virtual_tokens": 4, "freeze.trainable_layers": 1}))  # fmt: skip
    report = json.loads((run.path / "eval.json").read_text())
    assert "f1" in report["validation"]
    if METHODS[method].merge is not None and not METHODS[method].PLAIN_WEIGHTS:
        assert report["merge"]["max_abs_diff"] < 1e-4
    row = qa_rows(1, seed=15, unanswerable=0)[0]
    [result] = load(run.path).predict([row["question"]], [row["context"]])
    if result["answer"] is not None:
        assert row["context"][result["start"] : result["end"]] == result["answer"]


@pytest.fixture(scope="module")
def qa_lora_run(qa_bert, qa_files, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("qa-lora")
    return train(**settings(qa_bert, out, method="lora", **{"data.train": str(qa_files["validation"]),
                                                            "train.max_steps": 3}))  # fmt: skip


@pytest.mark.parametrize("merge", [True, False])
def test_export_merged_and_adapter(qa_lora_run, tmp_path, merge):
    from tunelab.export import export

    report = export(qa_lora_run.path, tmp_path / "export", merge=merge, say=lambda *a: None)
    assert report["max_abs_diff"] < 1e-3 and report["task"] == "question-answering"
    if merge:
        from transformers import AutoModelForQuestionAnswering

        model = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "export")
        assert type(model).__name__ == "BertForQuestionAnswering"
    else:
        assert (tmp_path / "export" / "adapter_config.json").is_file()
        config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
        assert config["task_type"] == "FEATURE_EXTRACTION" and "qa_outputs" in " ".join(
            config["modules_to_save"]
        )


def test_estimate_and_compare_run_question_answering(qa_bert, qa_files, tmp_path):
    import tunelab
    from tunelab.cli import main

    result = tunelab.estimate(model=str(qa_bert), task="question-answering", train=str(qa_files["validation"]),
                              num_threads=1, methods=["lora"], steps=2, say=lambda m: None,
                              **{"data.max_length": 48, "data.doc_stride": 16})  # fmt: skip
    (row,) = result.methods
    assert row.method == "lora" and row.epoch_s > 0 and row.trainable_params > 0
    out = tmp_path / "cmp"
    args = ["compare", f"model={qa_bert}", "task=question-answering", f"data.train={qa_files['validation']}",
            "data.max_length=48", "data.doc_stride=16", "--methods", "full,lora", "--epochs", "1",
            "--max-memory", "100000", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert "f1" in json.dumps(results)
