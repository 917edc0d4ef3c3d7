"""Catalogue rows: the command line itself (flags, commands, a data file where the config goes)
and the files `eval --data` / `predict --file` read (see harness.py for what each row is held
to); then what those two commands promise on success: `--text-column` and friends, and one
output line per input row, blank rows included."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import tunelab.run
from tests.catalogue.harness import Case, check
from tests.conftest import sentiment_rows
from tunelab.cli import main

ROWS = sentiment_rows(24)
TRAIN = "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in ROWS)
OTHER = "review,sentiment\n" + "".join(f"{r['text']},{r['label']}\n" for r in ROWS[:6])
CONFIG = "model: {bert}\ntask: classification\ndata:\n  train: train.csv\n"
PROMPTS = "prompt,completion\n" + "".join(f"say {i},{i}\n" for i in range(12))
RUN: dict[str, Path] = {}  # "run", "lm": finished tiny runs, trained once for this module


def with_run(folder: Path, name: str = "run") -> None:
    shutil.copytree(RUN[name], folder / name)


def run_case(id: str, argv: list[str], phrase: str, files: dict[str, str | bytes] | None = None,
             run: str = "run") -> Case:  # fmt: skip
    """A row on a finished run (copied in as `run` or `lm`); eval may leave its report inside it."""
    return Case(id, argv, phrase, files=files or {}, setup=lambda f: with_run(f, run), may_create=(run,))


CASES = [
    # flags and commands
    Case(
        "flag-epochs",
        ["train", "c.yaml", "--epochs=1"],
        "write train.epochs=1",
        files={"c.yaml": CONFIG, "train.csv": TRAIN},
    ),  # fmt: skip
    Case(
        "flag-learning-rate",
        ["train", "c.yaml", "--learning-rate=3e-4"],
        "train.learning_rate=3e-4",
        files={"c.yaml": CONFIG, "train.csv": TRAIN},
    ),  # fmt: skip
    Case(
        "flag-dotted-key",
        ["train", "c.yaml", "--data.max_length=64"],
        "data.max_length=64",
        files={"c.yaml": CONFIG, "train.csv": TRAIN},
    ),  # fmt: skip
    Case(
        "flag-unknown",
        ["train", "c.yaml", "--frobnicate"],
        "unrecognized arguments: --frobnicate",
        files={"c.yaml": CONFIG, "train.csv": TRAIN},
    ),  # fmt: skip
    Case(
        "flag-on-estimate",
        ["estimate", "c.yaml", "--batch-size=4"],
        "train.batch_size=4",
        files={"c.yaml": CONFIG, "train.csv": TRAIN},
    ),  # fmt: skip
    Case("unknown-command", ["trian", "c.yaml"], "invalid choice: 'trian'"),
    Case("no-command", [], "required: COMMAND"),
    # a data file where the config goes
    Case(
        "config-is-csv",
        ["train", "train.csv"],
        "tunelab train data.train=train.csv",
        files={"train.csv": TRAIN},
    ),
    Case(
        "config-is-jsonl",
        ["train", "rows.jsonl"],
        "looks like a data file",
        files={"rows.jsonl": '{"text": "a", "label": "pos"}\n'},
    ),  # fmt: skip
    Case(
        "config-is-json-rows",
        ["estimate", "rows.json"],
        "looks like a data file",
        files={"rows.json": '[{"text": "a", "label": "pos"}]'},
    ),  # fmt: skip
    Case(
        "config-is-conll",
        ["data", "check", "ner.conll"],
        "looks like a data file",
        files={"ner.conll": "John B-PER\n"},
    ),  # fmt: skip
    Case("config-not-utf8", ["train", "c.yaml"], "c.yaml: not UTF-8", files={"c.yaml": b"model: caf\xe9\n"}),
    Case(
        "config-control-character", ["train", "c.yaml"], "not valid YAML", files={"c.yaml": "model: \x1f\n"}
    ),
    # eval and predict on the finished run: columns, labels, files
    run_case(
        "eval-other-columns",
        ["eval", "run", "--data", "other.csv"],
        "give --text-column <column name>",
        {"other.csv": OTHER},
    ),  # fmt: skip
    run_case(
        "eval-other-label-column",
        ["eval", "run", "--data", "other.csv", "--text-column", "review"],
        "give --label-column <column name>",
        {"other.csv": OTHER},
    ),  # fmt: skip
    run_case(
        "predict-other-columns",
        ["predict", "run", "--file", "other.csv"],
        "give --text-column",
        {"other.csv": OTHER},
    ),  # fmt: skip
    run_case(
        "eval-label-unknown-to-run",
        ["eval", "run", "--data", "e.csv"],
        "e.csv:3: label 'neutral' is not one of the labels this run was trained on",
        {"e.csv": "text,label\ngood,positive\nfine,neutral\n"},
    ),  # fmt: skip
    run_case(
        "eval-text-column-is-label",
        ["eval", "run", "--data", "e.csv", "--text-column", "label"],
        "both name the column 'label'",
        {"e.csv": TRAIN},
    ),  # fmt: skip
    run_case(
        "eval-nan-label",
        ["eval", "run", "--data", "e.csv"],
        "e.csv:3: column 'label' holds 'nan'",
        {"e.csv": "text,label\ngood,positive\nfine,nan\n"},
    ),  # fmt: skip
    run_case("eval-data-missing", ["eval", "run", "--data", "nope.csv"], "data file not found: nope.csv"),
    run_case("eval-unknown-flag", ["eval", "run", "--epochs=1"], "unrecognized arguments: --epochs=1"),
    run_case("predict-nothing", ["predict", "run"], "give one of TEXT, --file FILE"),
    run_case(
        "predict-duplicate-header",
        ["predict", "run", "--file", "p.csv"],
        "column 'text' appears twice",
        {"p.csv": "text,text\na,b\n"},
    ),  # fmt: skip
    run_case(
        "predict-empty-file", ["predict", "run", "--file", "p.csv"], "p.csv: the file is empty", {"p.csv": ""}
    ),  # fmt: skip
    run_case(
        "predict-jsonl-bad-line",
        ["predict", "run", "--file", "p.jsonl"],
        "p.jsonl:2:",
        {"p.jsonl": '{"text": "a"}\n{"text": \n'},
    ),  # fmt: skip
]


@pytest.fixture(scope="module")
def finished(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (2 steps), copied into the rows that need one."""
    out = tmp_path_factory.mktemp("finished") / "run"
    (out.parent / "train.csv").write_text(TRAIN)
    tunelab.run.train(overrides=[f"model={models['bert']}", "task=classification",
                                 f"data.train={out.parent / 'train.csv'}", "train.max_steps=2",
                                 "train.progress_bar=false", f"output_dir={out}"])  # fmt: skip
    RUN["run"] = out
    lm = out.parent / "lm"
    (out.parent / "prompts.csv").write_text(PROMPTS)
    tunelab.run.train(overrides=[f"model={models['llama']}", "task=causal-lm",
                                 f"data.train={out.parent / 'prompts.csv'}", "train.max_steps=1",
                                 "train.progress_bar=false", f"output_dir={lm}"])  # fmt: skip
    RUN["lm"] = lm
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_catalogue(case: Case, tmp_path: Path, models: dict[str, Path], finished: Path,
                   capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    check(case, tmp_path / "user", models, capsys, monkeypatch)


def test_predict_file_keeps_one_line_per_row(finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                             ) -> None:  # fmt: skip
    """Blank rows keep their place (marked "skipped"), so output line N answers input row N."""
    texts = tmp_path / "texts.csv"
    texts.write_text("text\ngood film\n\nbad plot\n   \nfine\n")
    out = tmp_path / "out.jsonl"
    assert main(["predict", str(finished), "--file", str(texts), "--output", str(out)]) == 0
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in results] == ["good film", "", "bad plot", "", "fine"]
    assert [("skipped" in r, "label" in r) for r in results] == [(False, True), (True, False), (False, True),
                                                                (True, False), (False, True)]  # fmt: skip
    assert results[1]["skipped"] == "empty input (line 3)" and results[3]["skipped"] == "empty input (line 5)"
    assert "2 blank rows" in capsys.readouterr().err
    # the same texts alone give the same labels: skipping shifted nothing
    alone = tunelab.run.load(finished).predict(["good film", "bad plot", "fine"])
    assert [r["label"] for r in results if "label" in r] == [r["label"] for r in alone]


def test_column_flags_read_a_file_with_other_names(finished: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    other = tmp_path / "other.csv"
    other.write_text(OTHER)
    report = tmp_path / "report.json"
    argv = ["eval", str(finished), "--data", str(other), "--text-column", "review", "--label-column",
            "sentiment", "--output", str(report)]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads(report.read_text())
    assert sum(s["support"] for s in metrics["per_class"].values()) == 6
    out = tmp_path / "p.jsonl"
    assert (
        main(
            ["predict", str(finished), "--file", str(other), "--text-column", "review", "--output", str(out)]
        )
        == 0
    )
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == [
        r["text"] for r in ROWS[:6]
    ]
    assert (finished / "config.yaml").read_text().count("text_column: text") == 1  # the run keeps its own
