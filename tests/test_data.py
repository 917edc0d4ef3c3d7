"""Reading data files, and the classification task's checks, label mapping and splits.

Every bad-input message is asserted in full (from its start): it must name the file, the line
or row, the column where one applies, and what to do about it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tunelab.config import load_config
from tunelab.data import read_table
from tunelab.errors import DataError
from tunelab.tasks.classification import ClassificationTask, sort_labels


class CharTokenizer:
    """Stand-in for a Hugging Face tokenizer: one id per character (a pair follows a 0)."""

    def __call__(self, texts, pairs=None, truncation=True, max_length=512):
        assert truncation
        ids = []
        for i, text in enumerate(texts):
            row = [ord(c) for c in text] + ([0] + [ord(c) for c in pairs[i]] if pairs else [])
            ids.append(row[:max_length])
        return {"input_ids": ids}


def decode(example: dict[str, Any]) -> str:
    return "".join(chr(i) for i in example["input_ids"])


def write(path: Path, content: str | bytes | list[dict[str, Any]]) -> Path:
    """Text or bytes as they are; a list of rows as Parquet."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(content), path)
    return path


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Rows in the format the file's extension names."""
    suffix = path.suffix
    if suffix == ".parquet":
        return write(path, rows)
    if suffix == ".json":
        return write(path, json.dumps(rows))
    if suffix == ".jsonl":
        return write(path, "".join(json.dumps(r) + "\n" for r in rows))
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if suffix == ".tsv" else ",")
        writer.writeheader()
        writer.writerows(rows)
    return path


def task(**kwargs: Any) -> ClassificationTask:
    return ClassificationTask(load_config(**kwargs))


# ---------------------------------------------------------------------------- formats


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig"])  # Excel writes a byte-order mark
def test_csv_with_quoted_commas(tmp_path, encoding):
    path = tmp_path / "train.csv"
    path.write_text('text,label\n"good, really good",pos\nbad,neg\n', encoding=encoding)
    table = read_table(path)
    assert table.columns == ["text", "label"]
    assert table.rows == [{"text": "good, really good", "label": "pos"}, {"text": "bad", "label": "neg"}]
    assert [table.where(i) for i in range(2)] == [f"{path}:2", f"{path}:3"]


def test_csv_row_spanning_lines_is_located_at_its_first_line(tmp_path):
    path = write(tmp_path / "train.csv", 'text,label\n"two\nlines",pos\n\nnext,neg\n')
    table = read_table(path)
    assert [r["text"] for r in table.rows] == ["two\nlines", "next"]
    assert table.lines == ["line 2", "line 5"]


def test_tsv_takes_quotes_literally(tmp_path):
    path = write(tmp_path / "train.tsv", 'sentence\tlabel\nhe said "hi, there\t1\n"quoted"\t0\n')
    table = read_table(path)
    assert table.rows == [
        {"sentence": 'he said "hi, there', "label": "1"},
        {"sentence": '"quoted"', "label": "0"},
    ]


def test_json_list_and_wrapper(tmp_path):
    rows = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]
    for name, content in (("list.json", rows), ("wrapped.json", {"data": rows})):
        path = write(tmp_path / name, json.dumps(content, indent=2))
        table = read_table(path)
        assert table.rows == rows and table.columns == ["text", "label"]
        assert table.where(1) == f"{path} (row 2)"


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = write(
        tmp_path / "train.jsonl", '{"text": "good", "label": "pos"}\n\n{"text": "bad", "label": "neg"}\n'
    )
    table = read_table(path)
    assert [r["text"] for r in table.rows] == ["good", "bad"]
    assert table.where(1) == f"{path}:3"


def test_parquet(tmp_path):
    path = write(tmp_path / "train.parquet", [{"text": "good", "label": 1}, {"text": "bad", "label": 0}])
    table = read_table(path)
    assert table.rows == [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]
    assert table.where(0) == f"{path} (row 1)"


def test_format_setting_overrides_the_extension(tmp_path):
    path = write(tmp_path / "train.txt", "text\tlabel\ngood, fine\tpos\n")
    assert read_table(path, "tsv").rows == [{"text": "good, fine", "label": "pos"}]
    table = task(format="tsv").read(str(path))
    assert table.rows == [{"text": "good, fine", "label": "pos"}]


def test_unknown_extension(tmp_path):
    path = write(tmp_path / "train.dat", "text,label\ngood,pos\n")
    message = (
        f"{path}: cannot tell the format from the extension '.dat'; rename the file to one of "
        f".csv, .tsv, .json, .jsonl, .parquet, .txt or set data.format"
    )
    with pytest.raises(DataError, match="^" + re.escape(message) + "$"):
        read_table(path)


# ---------------------------------------------------------------------------- bad input

NO_PARQUET_ROWS: list[dict[str, Any]] = []

# (file name, content (None: no file), config kwargs, message: the start of it, {path} filled in)
BAD_INPUT = [
    ("missing.csv", None, {}, "data file not found: {path} (check the path; it is read relative to"),
    ("empty.csv", "", {}, "{path}: the file is empty; it needs a header line and at least one row"),
    ("empty.jsonl", "", {}, "{path}: the file is empty; it needs at least one example"),
    ("header.csv", "text,label\n", {}, "{path}: the file has no data rows"),
    ("blank.jsonl", "\n\n", {}, "{path}: the file has no data rows"),
    ("none.json", "[]", {}, "{path}: the file has no data rows"),
    ("noheader.csv", ",,\ngood,pos,x\n", {}, "{path}: the first line must be a header naming the columns"),
    (
        "fields.csv",
        "text,label\ngood,pos\ngood, really,pos\n",
        {},
        "{path}:3: expected 2 fields (text, label), found 3; quote fields that contain commas",
    ),
    (
        "unclosed.csv",
        'text,label\ngood,pos\n"bad,neg\nfine,pos\n',
        {},
        "{path}:3: expected 2 fields (text, label), found 1; the row runs on to line 4: "
        "check for an unclosed quote on line 3",
    ),
    (
        "tab.tsv",
        "text\tlabel\ngood\tpos\ngood\tbad\tneg\n",
        {},
        "{path}:3: expected 2 fields (text, label), found 3; a TSV field may not contain a tab",
    ),
    (
        "latin1.csv",
        b"text,label\ngood,pos\ncaf\xe9,neg\n",
        {},
        "{path}:3:4: not UTF-8 text (byte 0xe9); save the file as UTF-8",
    ),
    (
        "latin1.jsonl",
        b'{"text": "good", "label": 1}\n{"text": "caf\xe9", "label": 0}\n',
        {},
        "{path}:2:14: not UTF-8 text (byte 0xe9); save the file as UTF-8",
    ),
    (
        "latin1.json",
        b'[{"text": "caf\xe9", "label": 0}]',
        {},
        "{path}:1:15: not UTF-8 text (byte 0xe9); save the file as UTF-8",
    ),
    (
        "bad.jsonl",
        '{"text": "a", "label": 1}\n{"text": "b", "label": 2}\n{"text": "c", label: 3}\n',
        {},
        "{path}:3:15: not valid JSON (Expecting property name enclosed in double quotes); "
        "each line must be one JSON object",
    ),
    ("list.jsonl", '{"text": "a", "label": 1}\n["b", 2]\n', {}, "{path}:2: expected a JSON object, got list"),
    (
        "bad.json",
        '[\n  {"text": "a", "label": 1},\n  {"text": "b" "label": 2}\n]',
        {},
        "{path}:3:16: not valid JSON (Expecting ',' delimiter)",
    ),
    (
        "object.json",
        '{"text": "a", "label": 1}',
        {},
        "{path}: expected a JSON list of objects (one per example), got dict; or use JSONL, one object per line",
    ),
    (
        "strings.json",
        '[{"text": "a", "label": 1}, "b"]',
        {},
        "{path} (row 2): expected a JSON object, got str",
    ),
    ("corrupt.parquet", b"not parquet at all", {}, "{path}: not a readable Parquet file ("),
    ("noparquetrows.parquet", NO_PARQUET_ROWS, {}, "{path}: the file has no data rows"),
    # the task's checks: columns, empty texts, missing labels
    (
        "review.csv",
        "review,label\ngood,pos\n",
        {},
        "{path}: no column 'text'; the file has: review, label. Set data.text_column=<column name>",
    ),
    (
        "case.csv",
        "Text,label\ngood,pos\n",
        {},
        "{path}: no column 'text' (did you mean 'Text'?); the file has: Text, label. "
        "Set data.text_column=<column name>",
    ),
    (
        "sentiment.jsonl",
        '{"text": "good", "sentiment": "pos"}\n',
        {},
        "{path}: no column 'label'; the file has: text, sentiment. Set data.label_column=<column name>",
    ),
    (
        "pair.csv",
        "text,label\ngood,pos\n",
        {"text_pair_column": "hypothesis"},
        "{path}: no column 'hypothesis'; the file has: text, label. Set data.text_pair_column=<column name>",
    ),
    (
        "sentence.csv",
        "sentence,y\ngood,pos\n",
        {"text_column": "text"},
        "{path}: no column 'text'; the file has: sentence, y. Set data.text_column=<column name>",
    ),
    (
        "blanktext.csv",
        "text,label\ngood,pos\n  ,neg\n",
        {},
        "{path}:3: column 'text' is empty; fill in the text or remove the row",
    ),
    (
        "nulltext.json",
        '[{"text": "good", "label": 1}, {"text": null, "label": 0}]',
        {},
        "{path} (row 2): column 'text' is empty; fill in the text or remove the row",
    ),
    (
        "nopair.jsonl",
        '{"premise": "a", "hypothesis": "b", "label": 1}\n{"premise": "a", "label": 0}\n',
        {"text_column": "premise", "text_pair_column": "hypothesis"},
        "{path}:2: column 'hypothesis' is empty; fill in the text or remove the row",
    ),
    (
        "nolabel.csv",
        "text,label\ngood,pos\nbad,\n",
        {},
        "{path}:3: column 'label' has no label; fill it in or remove the row",
    ),
    (
        "nolabel.tsv",
        "text\tlabel\ngood\tpos\nbad\t \n",
        {},
        "{path}:3: column 'label' has no label; fill it in or remove the row",
    ),
    (
        "nulllabel.json",
        '[{"text": "good", "label": 1}, {"text": "bad", "label": null}]',
        {},
        "{path} (row 2): column 'label' has no label; fill it in or remove the row",
    ),
    (
        "nanlabel.json",
        '[{"text": "good", "label": 1}, {"text": "bad", "label": NaN}]',
        {},
        "{path} (row 2): column 'label' has no label; fill it in or remove the row",
    ),
    (
        "absentlabel.jsonl",
        '{"text": "good", "label": 1}\n{"text": "bad"}\n',
        {},
        "{path}:2: column 'label' has no label; fill it in or remove the row",
    ),
    (
        "nonelabel.parquet",
        [{"text": "good", "label": 1}, {"text": "bad", "label": None}],
        {},
        "{path} (row 2): column 'label' has no label; fill it in or remove the row",
    ),
    (
        "nanlabel.parquet",
        [{"text": "good", "label": 1.0}, {"text": "bad", "label": float("nan")}],
        {},
        "{path} (row 2): column 'label' has no label; fill it in or remove the row",
    ),
]


@pytest.mark.parametrize(("name", "content", "kwargs", "message"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_message_names_file_place_and_fix(tmp_path, name, content, kwargs, message):
    path = tmp_path / name
    if content is not None:
        write(path, content)
    with pytest.raises(DataError, match="^" + re.escape(message.format(path=path))):
        task(**kwargs).read(str(path))


def test_a_folder_instead_of_a_file(tmp_path):
    with pytest.raises(
        DataError, match="^" + re.escape(f"{tmp_path} is a folder; give the data file inside it")
    ):
        read_table(tmp_path)


def test_no_training_file():
    with pytest.raises(DataError, match=re.escape("no training data: set data.train=<file>")):
        task().load_splits(CharTokenizer())


# ---------------------------------------------------------------------------- labels


def test_integer_and_string_labels_map_to_the_same_names(tmp_path):
    """JSON ints, CSV strings and Parquet floats all mean the same labels "0" and "1"."""
    train = write_rows(tmp_path / "train.json", [{"text": "bad", "label": 0}, {"text": "good", "label": 1}])
    validation = write(tmp_path / "validation.csv", "text,label\ngood,1\nbad,0\n")
    test = write(tmp_path / "test.parquet", [{"text": "bad", "label": 0.0}, {"text": "good", "label": 1.0}])
    t = task(train=str(train), validation=str(validation), test=str(test))
    splits = t.load_splits(CharTokenizer())
    assert t.labels == ["0", "1"]
    assert [(decode(e), e["labels"]) for e in splits.train] == [("bad", 0), ("good", 1)]
    assert [(decode(e), e["labels"]) for e in splits.validation] == [("good", 1), ("bad", 0)]
    assert [(decode(e), e["labels"]) for e in splits.test] == [("bad", 0), ("good", 1)]
    assert splits.files == {"train": str(train), "validation": str(validation), "test": str(test)}


@pytest.mark.parametrize(
    ("labels", "order"),
    [
        (["2", "10", "1"], ["1", "2", "10"]),
        (["-1", "0", "1"], ["-1", "0", "1"]),
        (["pos", "neg", "neutral"], ["neg", "neutral", "pos"]),
        (["10", "2", "b"], ["10", "2", "b"]),  # not all int-like: plain string order
        (["1", "--1"], ["--1", "1"]),  # "--1" is not an integer (and must not crash int())
    ],
)
def test_label_order(tmp_path, labels, order):
    path = write_rows(
        tmp_path / "train.csv", [{"text": f"t{i}", "label": x} for i, x in enumerate(labels * 2)]
    )
    t = task(train=str(path), validation=str(path))
    t.load_splits(CharTokenizer())
    assert t.labels == order
    assert sort_labels(set(labels)) == order


def test_labels_from_the_config_keep_their_order(tmp_path):
    path = write(tmp_path / "train.csv", "text,label\na,neg\nb,pos\n")
    t = task(train=str(path), validation=str(path), labels=["pos", "neg"])
    splits = t.load_splits(CharTokenizer())
    assert t.labels == ["pos", "neg"] and [e["labels"] for e in splits.train] == [1, 0]
    assert t.label_ids(t.read(str(path))) == [1, 0]


@pytest.mark.parametrize("split", ["validation", "test"])
def test_label_never_seen_in_training(tmp_path, split):
    train = write(tmp_path / "train.csv", "text,label\na,neg\nb,pos\n")
    other = write(tmp_path / f"{split}.csv", "text,label\na,neg\nb,maybe\n")
    files = {"validation": str(train), split: str(other)}
    message = (
        f"{other}:3: label 'maybe' never appears in the training data (known labels: neg, pos); "
        f"fix the label or add training examples"
    )
    with pytest.raises(DataError, match="^" + re.escape(message) + "$"):
        task(train=str(train), **files).load_splits(CharTokenizer())


def test_only_one_label_in_training(tmp_path):
    train = write(tmp_path / "train.csv", "text,label\na,pos\nb,pos\n")
    message = f"{train}: column 'label' has only one label (pos); classification needs at least two"
    with pytest.raises(DataError, match="^" + re.escape(message) + "$"):
        task(train=str(train)).load_splits(CharTokenizer())


def test_encoding_pairs_and_truncation(tmp_path):
    path = write(
        tmp_path / "train.jsonl",
        '{"a": "abc", "b": "xy", "label": "y"}\n{"a": "d", "b": "e", "label": "n"}\n',
    )
    t = task(train=str(path), validation=str(path), text_column="a", text_pair_column="b", max_length=4)
    splits = t.load_splits(CharTokenizer())
    assert [decode(e) for e in splits.train] == ["abc\0", "d\0e"]
    assert [e["labels"] for e in splits.train] == [1, 0]


# ---------------------------------------------------------------------------- splits

COUNTS = {"a": 60, "b": 30, "c": 10, "d": 2, "e": 1}


@pytest.fixture
def unsplit(tmp_path) -> Path:
    rows = [{"text": f"{label}{i}", "label": label} for label, n in COUNTS.items() for i in range(n)]
    return write_rows(tmp_path / "train.csv", rows)


def split_texts(path: Path, **kwargs: Any) -> tuple[list[str], list[str]]:
    splits = task(train=str(path), **kwargs).load_splits(CharTokenizer())
    return [decode(e) for e in splits.train], [decode(e) for e in splits.validation]


def test_stratified_split_keeps_label_shares(unsplit):
    train, validation = split_texts(unsplit, validation_split=0.2)
    assert not set(train) & set(validation)
    assert sorted(train + validation) == sorted(f"{k}{i}" for k, n in COUNTS.items() for i in range(n))
    held = Counter(t[0] for t in validation)
    assert held == {"a": 12, "b": 6, "c": 2, "d": 1}  # round(n * 0.2), at least one of 2+ rows, never all
    kept = Counter(t[0] for t in train)
    assert kept == {"a": 48, "b": 24, "c": 8, "d": 1, "e": 1}


def test_every_class_with_two_rows_is_on_both_sides(unsplit):
    for share in (0.01, 0.5, 0.99):
        train, validation = split_texts(unsplit, validation_split=share)
        for label in "abcd":
            assert any(t[0] == label for t in train) and any(t[0] == label for t in validation), (
                share,
                label,
            )


def test_split_is_seeded(unsplit):
    assert split_texts(unsplit, seed=1) == split_texts(unsplit, seed=1)
    assert split_texts(unsplit, seed=1)[1] != split_texts(unsplit, seed=2)[1]


def test_max_train_samples_is_seeded(unsplit):
    first, _ = split_texts(unsplit, seed=1, max_train_samples=20)
    assert len(first) == 20
    assert split_texts(unsplit, seed=1, max_train_samples=20)[0] == first
    assert split_texts(unsplit, seed=2, max_train_samples=20)[0] != first
    everything, _ = split_texts(unsplit, seed=1)
    assert set(first) <= set(everything)  # sampled from the training side of the split only


def test_max_eval_samples_caps_validation_and_test(tmp_path, unsplit):
    splits = task(
        train=str(unsplit), validation=str(unsplit), test=str(unsplit), max_eval_samples=7
    ).load_splits(CharTokenizer())
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (sum(COUNTS.values()), 7, 7)


def test_too_few_rows_for_a_validation_split_is_reported(tmp_path):
    from tunelab.config import load_config
    from tunelab.tasks import TASKS

    path = tmp_path / "tiny.csv"
    path.write_text("text,label\ngood,pos\nbad,neg\n")
    task = TASKS["classification"](load_config(train=str(path)))
    with pytest.raises(
        DataError, match=r"too few rows to hold out a validation set .*data.validation=<file>"
    ):
        task.load_splits(tokenizer=None)


def test_a_class_named_none_is_kept_when_data_labels_lists_it(tmp_path):
    path = write(tmp_path / "train.csv", "text,label\na,None\nb,pos\nc,None\nd,pos\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:2: column 'label' holds 'None', a missing value")):
        task(train=str(path), validation=str(path)).load_splits(CharTokenizer())
    t = task(train=str(path), validation=str(path), labels=["None", "pos"])
    assert [e["labels"] for e in t.load_splits(CharTokenizer()).train] == [0, 1, 0, 1]


def test_numeric_labels_suggest_regression_unless_data_labels_lists_them(tmp_path):
    values = [f"{i / 4:.2f}" for i in range(12)]
    path = write(
        tmp_path / "train.csv", "text,label\n" + "".join(f"t{i},{v}\n" for i, v in enumerate(values))
    )
    with pytest.raises(DataError, match="has 12 distinct numbers .*set task=regression"):
        task(train=str(path), validation=str(path)).load_splits(CharTokenizer())
    assert (
        len(task(train=str(path), validation=str(path), labels=values).load_splits(CharTokenizer()).train)
        == 12
    )
    five = write(tmp_path / "stars.csv", "text,label\n" + "".join(f"t{i},{i % 5 + 1}\n" for i in range(20)))
    assert (
        task(train=str(five), validation=str(five)).load_splits(CharTokenizer()) is not None
    )  # star ratings stay classes
