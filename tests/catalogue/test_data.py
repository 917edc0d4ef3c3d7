"""Catalogue rows: the data files `train` reads, in every format and layout (see harness.py for
what each row is held to). Every row fails before the model loads, so the rows are quick."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.catalogue.harness import Case, check
from tests.conftest import sentiment_rows

ROWS = sentiment_rows(24)
TRAIN = "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in ROWS)
BERT = ["train", "model={bert}", "train.progress_bar=false"]
LLAMA = ["train", "model={llama}", "task=causal-lm", "train.progress_bar=false"]


def csv_with(label: str, row: int = 5) -> str:
    """TRAIN with the label of one data row (1-based) replaced."""
    lines = TRAIN.splitlines()
    text = lines[row].rsplit(",", 1)[0]
    lines[row] = f"{text},{label}"
    return "\n".join(lines) + "\n"


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def chat(n: int = 12) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i}"}]}
            for i in range(n)]  # fmt: skip


FLOATS = "text,label\n" + "".join(f"review number {i},{i * 0.37:.2f}\n" for i in range(80))
CONLL = "John B-PER\nlives O\nin O\nParis B-LOC\n\nMary B-PER\nsmiles O\n\n" * 6

CASES = [
    # labels that are no labels
    *[
        Case(
            f"csv-label-{marker}",
            [*BERT, "data.train=train.csv"],
            "train.csv:6: column 'label' holds",
            files={"train.csv": csv_with(marker)},
        )  # fmt: skip
        for marker in ("NaN", "nan", "NA", "null", "None")
    ],
    Case(
        "csv-label-empty",
        [*BERT, "data.train=train.csv"],
        "train.csv:6: column 'label' has no label",
        files={"train.csv": csv_with("")},
    ),  # fmt: skip
    Case(
        "labels-not-in-data.labels",
        [*BERT, "data.train=train.csv", "data.labels=[neg,pos]"],
        "is not in data.labels (neg, pos)",
        files={"train.csv": TRAIN},
    ),  # fmt: skip
    Case(
        "float-labels-as-classes",
        [*BERT, "data.train=train.csv"],
        "set task=regression",
        files={"train.csv": FLOATS},
    ),  # fmt: skip
    Case(
        "one-label-only",
        [*BERT, "data.train=train.csv"],
        "only one label",
        files={"train.csv": "text,label\n" + "".join(f"t{i},pos\n" for i in range(8))},
    ),  # fmt: skip
    Case(
        "regression-not-a-number",
        [*BERT, "task=regression", "data.train=train.csv"],
        "must be a number",
        files={"train.csv": "text,label\na,1.5\nb,many\nc,2\n"},
    ),  # fmt: skip
    Case(
        "multilabel-column-not-01",
        [*BERT, "data.train=train.csv", "data.label_columns=[a,b]"],
        "column 'b' must be 0 or 1",
        files={"train.csv": "text,a,b\nx,1,0\ny,0,maybe\n"},
    ),  # fmt: skip
    # columns
    Case(
        "csv-duplicate-header",
        [*BERT, "data.train=train.csv"],
        "column 'text' appears twice",
        files={"train.csv": "text,label,text\n" + "".join(f"{r['text']},{r['label']},x\n" for r in ROWS)},
    ),
    Case(
        "text-column-is-label-column",
        [*BERT, "data.train=train.csv", "data.text_column=label"],
        "data.text_column and data.label_column both name the column 'label'",
        files={"train.csv": TRAIN},
    ),
    Case(
        "missing-text-column",
        [*BERT, "data.train=train.csv"],
        "set data.text_column=",
        files={"train.csv": TRAIN.replace("text,label", "review,label", 1)},
    ),  # fmt: skip
    Case(
        "missing-label-column",
        [*BERT, "data.train=train.csv"],
        "set data.label_column=",
        files={"train.csv": TRAIN.replace("text,label", "text,sentiment", 1)},
    ),  # fmt: skip
    Case(
        "jsonl-duplicate-key",
        [*BERT, "data.train=train.jsonl"],
        "train.jsonl:1: key 'label' appears twice",
        files={"train.jsonl": '{"text": "a", "label": "pos", "label": "neg"}\n'},
    ),  # fmt: skip
    # malformed files
    Case("csv-empty", [*BERT, "data.train=train.csv"], "the file is empty", files={"train.csv": ""}),
    Case(
        "csv-header-only",
        [*BERT, "data.train=train.csv"],
        "no data rows",
        files={"train.csv": "text,label\n"},
    ),
    Case(
        "csv-extra-field",
        [*BERT, "data.train=train.csv"],
        "train.csv:3: expected 2 fields",
        files={"train.csv": "text,label\na,pos\nb, c,neg\n"},
    ),  # fmt: skip
    Case(
        "csv-unclosed-quote",
        [*BERT, "data.train=train.csv"],
        "unclosed quote",
        files={"train.csv": 'text,label\n"a,pos\nb,neg\nc,pos\n'},
    ),  # fmt: skip
    Case(
        "csv-latin-1",
        [*BERT, "data.train=train.csv"],
        "train.csv:2:4: not UTF-8",
        files={"train.csv": "text,label\ncaf\xe9,pos\n".encode("latin-1")},
    ),  # fmt: skip
    Case(
        "tsv-tab-in-field",
        [*BERT, "data.train=train.tsv"],
        "a TSV field may not contain a tab",
        files={"train.tsv": "text\tlabel\na\tb\tpos\n"},
    ),  # fmt: skip
    Case(
        "jsonl-bad-line",
        [*BERT, "data.train=train.jsonl"],
        "train.jsonl:2:",
        files={"train.jsonl": '{"text": "a", "label": "pos"}\n{"text": "b", label: neg}\n'},
    ),  # fmt: skip
    Case(
        "jsonl-not-an-object",
        [*BERT, "data.train=train.jsonl"],
        "train.jsonl:1: expected a JSON object",
        files={"train.jsonl": '["a", "pos"]\n'},
    ),  # fmt: skip
    Case(
        "json-not-a-list",
        [*BERT, "data.train=train.json"],
        "expected a JSON list of objects",
        files={"train.json": '"just text"'},
    ),  # fmt: skip
    Case(
        "unknown-extension",
        [*BERT, "data.train=train.xlsx"],
        "cannot tell the format",
        files={"train.xlsx": b"PK\x03\x04"},
    ),  # fmt: skip
    Case("data-is-a-folder", [*BERT, "data.train=data"], "is a folder", setup=lambda f: (f / "data").mkdir()),
    Case(
        "parquet-corrupt",
        [*BERT, "data.train=train.parquet"],
        "not a readable Parquet file",
        files={"train.parquet": b"PAR1 not really"},
    ),  # fmt: skip
    # CoNLL and token rows
    Case(
        "conll-tag-not-bio",
        [*BERT, "task=token-classification", "data.train=train.conll"],
        "train.conll:5: tag 'X-PER' is not BIO/IOB2/BIOES",
        files={"train.conll": "John B-PER\nis O\n\nBob O\nAnn X-PER\n"},
    ),
    Case(
        "conll-missing-tag",
        [*BERT, "task=token-classification", "data.train=train.conll"],
        "train.conll:2: expected 'word tag'",
        files={"train.conll": "John B-PER\nlives\n"},
    ),  # fmt: skip
    Case(
        "conll-latin-1",
        [*BERT, "task=token-classification", "data.train=train.conll"],
        "not UTF-8",
        files={"train.conll": "Jos\xe9 B-PER\n".encode("latin-1")},
    ),  # fmt: skip
    Case(
        "tokens-tags-lengths-differ",
        [*BERT, "task=token-classification", "data.train=train.jsonl"],
        "one tag per word",
        files={"train.jsonl": jsonl([{"tokens": ["a", "b"], "tags": ["O"]}])},
    ),
    Case(
        "jsonl-tag-not-bio",
        [*BERT, "task=token-classification", "data.train=train.jsonl"],
        "train.jsonl:1, word 2: tag 'PER'",
        files={"train.jsonl": jsonl([{"tokens": ["a", "b"], "tags": ["O", "PER"]}])},
    ),
    # chat and instruction layouts (causal-lm)
    Case(
        "chat-last-turn-not-assistant",
        [*LLAMA, "data.train=chat.jsonl"],
        "must be the assistant's answer",
        files={"chat.jsonl": jsonl(chat() + [{"messages": [{"role": "user", "content": "hi"}]}])},
    ),  # fmt: skip
    Case(
        "chat-unknown-role",
        [*LLAMA, "data.train=chat.jsonl"],
        "messages[0].role is 'robot'",
        files={"chat.jsonl": jsonl([{"messages": [{"role": "robot", "content": "hi"}]}])},
    ),  # fmt: skip
    Case(
        "sharegpt-turn-not-object",
        [*LLAMA, "data.train=chat.jsonl"],
        "conversations[0] must be an object",
        files={"chat.jsonl": jsonl([{"conversations": ["hi"]}])},
    ),  # fmt: skip
    Case(
        "alpaca-empty-instruction",
        [*LLAMA, "data.train=a.jsonl"],
        "'instruction' is missing or empty",
        files={"a.jsonl": jsonl([{"instruction": "", "output": "x"}])},
    ),  # fmt: skip
    Case(
        "causal-lm-unknown-layout",
        [*LLAMA, "data.train=a.jsonl"],
        "cannot tell the layout",
        files={"a.jsonl": jsonl([{"question": "q", "reply": "r"}])},
    ),  # fmt: skip
    # seq2seq columns, QA rows
    Case(
        "seq2seq-missing-target",
        [*BERT, "task=seq2seq", "data.train=s.csv", "data.source_column=src", "data.target_column=tgt"],
        "no column 'tgt'",
        files={"s.csv": "src,other\na,b\n"},
    ),  # fmt: skip
    Case(
        "qa-answers-not-json",
        [*BERT, "task=question-answering", "data.train=qa.csv"],
        "'answers' is not JSON",
        files={"qa.csv": "question,context,answers\nwho?,Ann ran,{not json\n"},
    ),  # fmt: skip
    Case(
        "qa-squad-without-paragraphs",
        [*BERT, "task=question-answering", "data.train=squad.json"],
        "has no 'paragraphs' list",
        files={"squad.json": json.dumps({"data": [{"title": "x"}]})},
    ),  # fmt: skip
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_catalogue(case: Case, tmp_path: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str],
                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    check(case, tmp_path / "user", models, capsys, monkeypatch)
