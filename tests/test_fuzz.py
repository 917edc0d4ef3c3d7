"""Fuzzing the edge with Hypothesis: the data readers (CSV, TSV, JSON, JSONL, Parquet, text,
CoNLL, and every task's `read`, the chat layouts among them) and the config parser (YAML text
and `key=value` overrides), given arbitrary bytes, text and JSON-like structures, either read
the input or raise tunelab's own error, on one line, naming the file (or the key). Never any
other exception.

The examples Hypothesis found are kept as explicit regression cases (`@example`). The example
counts are bounded so the whole module runs in well under a minute; no example database is
written (`database=None`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tunelab.config import field_docs, load_config
from tunelab.data import read_table
from tunelab.errors import TunelabError
from tunelab.tasks import TASKS
from tunelab.tasks.token_classification import read_conll

# TUNELAB_FUZZ_EXAMPLES=2000 digs deeper by hand; the default keeps `make test` quick
SETTINGS = settings(max_examples=int(os.environ.get("TUNELAB_FUZZ_EXAMPLES", "100")), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
FORMATS = [".csv", ".tsv", ".json", ".jsonl", ".txt", ".parquet", ".conll"]

# the names the readers look for, so that generated rows reach past the first column check
NAMES = ["text", "label", "text_pair", "tokens", "tags", "messages", "conversations", "role", "content",
         "from", "value", "system", "instruction", "input", "output", "history", "prompt", "completion",
         "source", "target", "question", "context", "answers", "answer_start", "is_impossible", "id",
         "data", "paragraphs", "qas", "title"]  # fmt: skip
ROLES = ["user", "assistant", "system", "human", "gpt", "tool", ""]

scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=12) | st.sampled_from(["NaN", "None", "B-PER", "X-PER", "O", *ROLES])
)  # fmt: skip
keys = st.sampled_from(NAMES) | st.text(max_size=6)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=24,
)
rows = st.lists(st.dictionaries(keys, json_values, max_size=6), max_size=5)
cell_text = st.text(alphabet=st.sampled_from(list(',\t"\n\r ;:{}[]-abcB-IOXé\x00\ufeff\u2028')), max_size=160)


def refused_well(read: Callable[[], Any], where: str) -> None:
    """`read()` succeeds, or raises a TunelabError on one line that names `where`."""
    try:
        read()
    except TunelabError as e:
        message = str(e)
        assert "\n" not in message and "\r" not in message, f"message on several lines: {message!r}"
        assert where in message, f"{message!r} does not name {where!r}"


def write(folder: Path, suffix: str, content: str | bytes, name: str = "data") -> Path:
    path = folder / f"{name}{suffix}"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    return path


# ---------------------------------------------------------------------------- files as bytes and text


@SETTINGS
@given(content=st.binary(max_size=300), suffix=st.sampled_from(FORMATS))
@example(content=b"\xff\xfe", suffix=".conll")  # found: CoNLL read crashed on bytes that are not UTF-8
@example(content=b"a,a\n1,2\n", suffix=".csv")  # a duplicated header, refused
@example(content=b'"a\nb","a\nb"\n1,2\n', suffix=".csv")  # found: a header name with a newline
@example(content=b"[[[[[[[[[[" * 200 + b"]" * 2000, suffix=".json")  # deep nesting
def test_table_readers_on_bytes(tmp_path: Path, content: bytes, suffix: str) -> None:
    path = write(tmp_path, suffix, content)
    if suffix == ".conll":
        refused_well(lambda: read_conll(path), str(path))
    else:
        refused_well(lambda: read_table(path), str(path))


@SETTINGS
@given(content=cell_text, suffix=st.sampled_from([".csv", ".tsv", ".txt", ".conll"]))
@example(content=",\n,\n", suffix=".csv")  # a header of two unnamed columns
@example(content="a\tb\n\u2028x\ty\n", suffix=".tsv")
def test_delimited_and_conll_text(tmp_path: Path, content: str, suffix: str) -> None:
    path = write(tmp_path, suffix, content)
    if suffix == ".conll":
        refused_well(lambda: TASKS["token-classification"](load_config(task="token-classification")).read(
            str(path)), str(path))  # fmt: skip
    else:
        refused_well(lambda: read_table(path), str(path))


@SETTINGS
@given(value=json_values, suffix=st.sampled_from([".json", ".jsonl"]))
@example(value=[{"a": 1}, 2], suffix=".json")
@example(value=[[1]], suffix=".jsonl")
def test_json_structures(tmp_path: Path, value: Any, suffix: str) -> None:
    lines = value if suffix == ".jsonl" and isinstance(value, list) else [value]
    text = json.dumps(value) if suffix == ".json" else "".join(json.dumps(v) + "\n" for v in lines)
    path = write(tmp_path, suffix, text)
    refused_well(lambda: read_table(path), str(path))


# ---------------------------------------------------------------------------- every task's read

TASK_NAMES = ["classification", "regression", "token-classification", "causal-lm", "seq2seq",
              "question-answering", "masked-lm"]  # fmt: skip
LAYOUTS = ["auto", "messages", "sharegpt", "alpaca", "prompt-completion", "text"]


def task_config(task: str, layout: str) -> Any:
    data: dict[str, Any] = {}
    if task == "causal-lm" and layout != "auto":
        data["format"] = layout
    if task == "seq2seq":
        data.update(source_column="source", target_column="target")
    return load_config(task=task, data=data)


def as_file(folder: Path, table: list[dict[str, Any]], suffix: str) -> Path:
    if suffix == ".json":
        return write(folder, suffix, json.dumps(table))
    if suffix == ".jsonl":
        return write(folder, suffix, "".join(json.dumps(r) + "\n" for r in table))
    columns = list(dict.fromkeys(k for r in table for k in r)) or ["text"]
    cell = lambda v: str(v).replace(",", " ").replace("\n", " ").replace("\r", " ").replace('"', "")  # noqa: E731
    body = "".join(",".join(cell(r.get(c, "")) for c in columns) + "\n" for r in table)
    return write(folder, suffix, ",".join(cell(c) for c in columns) + "\n" + body)


@SETTINGS
@given(
    task=st.sampled_from(TASK_NAMES),
    layout=st.sampled_from(LAYOUTS),
    table=rows,
    suffix=st.sampled_from([".jsonl", ".json", ".csv"]),
    need_labels=st.booleans(),
)
@example(
    task="causal-lm", layout="auto", table=[{"\r": None}], suffix=".jsonl", need_labels=False
)  # found: a column name holding a newline broke the one-line message
@example(task="classification", layout="auto", table=[{"\r": None}], suffix=".jsonl", need_labels=False)
@example(task="classification", layout="auto", table=[{"text": "a", "label": "NaN"}], suffix=".csv",
         need_labels=True)  # fmt: skip
@example(task="token-classification", layout="auto", table=[{"tokens": ["a"], "tags": ["X-PER"]}],
         suffix=".jsonl", need_labels=True)  # fmt: skip
@example(task="causal-lm", layout="messages", table=[{"messages": [{"role": "user", "content": None}]}],
         suffix=".jsonl", need_labels=False)  # fmt: skip
@example(task="causal-lm", layout="sharegpt", table=[{"conversations": [{"from": [], "value": "x"}]}],
         suffix=".jsonl", need_labels=True)  # fmt: skip
@example(task="question-answering", layout="auto", table=[{"question": "q", "context": "c", "answers": 1}],
         suffix=".jsonl", need_labels=True)  # fmt: skip
@example(task="question-answering", layout="auto", table=[{"data": [{"paragraphs": [1]}]}], suffix=".json",
         need_labels=True)  # fmt: skip
def test_task_read(tmp_path: Path, task: str, layout: str, table: list[dict[str, Any]], suffix: str,
                   need_labels: bool) -> None:  # fmt: skip
    path = as_file(tmp_path, table, suffix)
    if suffix == ".json" and task == "question-answering" and table and "data" in table[0]:
        path = write(tmp_path, suffix, json.dumps(table[0]))  # a SQuAD-shaped object
    reader = TASKS[task](task_config(task, layout))
    refused_well(lambda: reader.read(str(path), need_labels=need_labels), str(path))


# ---------------------------------------------------------------------------- the config parser

CONFIG_KEYS = [k for k, _, _ in field_docs()]


@SETTINGS
@given(text=st.text(max_size=200) | st.sampled_from(["a: [", "data: 3", "- 1\n- 2", "train:\n  epochs: x"]))
@example(text="!!python/object:os.system x")
@example(text="data:\n  train: [1, 2]\n")
def test_config_yaml_text(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, ".yaml", text, name="config")
    try:
        load_config(path)
    except TunelabError as e:
        assert "\n" not in str(e), str(e)


@SETTINGS
@given(
    tree=st.dictionaries(
        st.sampled_from(["model", "task", "method", "data", "train", "lora", "seed", "output_dir"]) | keys,
        json_values | st.dictionaries(st.sampled_from([k.split(".")[-1] for k in CONFIG_KEYS]), json_values,
                                      max_size=4),
        max_size=5,
    )
)  # fmt: skip
@example(tree={"\n": {}})  # found: an unknown key holding a newline broke the one-line message
@example(tree={"data": {"labels": [None, 1]}})
@example(tree={"train": {"epochs": float("nan")}})
def test_config_yaml_structures(tmp_path: Path, tree: dict[str, Any]) -> None:
    path = write(tmp_path, ".yaml", yaml.safe_dump(tree, allow_unicode=True), name="config")
    try:
        load_config(path)
    except TunelabError as e:
        assert "\n" not in str(e), str(e)


override_values = st.text(max_size=20) | st.sampled_from(["[1, 2", "{a: 1}", "nan", "-inf", "null", "1e999",
                                                           "!!binary x", "&a *a", "[]", "{}"])  # fmt: skip


@SETTINGS
@given(overrides=st.lists(
    st.tuples(st.sampled_from(CONFIG_KEYS) | st.text(max_size=12), override_values).map("=".join)
    | st.text(max_size=20), max_size=4))  # fmt: skip
@example(overrides=["data=1", "data.train=x"])
@example(overrides=["train.epochs=.nan"])
@example(overrides=["=1"])
def test_config_overrides(overrides: list[str]) -> None:
    try:
        load_config(None, overrides)
    except TunelabError as e:
        message = str(e)
        assert "\n" not in message, message


@pytest.mark.parametrize("suffix", FORMATS)
def test_an_empty_file_names_itself(tmp_path: Path, suffix: str) -> None:
    path = write(tmp_path, suffix, b"")
    with pytest.raises(TunelabError, match="data"):
        read_conll(path) if suffix == ".conll" else read_table(path)


@SETTINGS
@given(content=st.binary(max_size=200))
@example(content=b"\xff")  # found: a config that is not UTF-8 escaped as UnicodeDecodeError
@example(content=b"\x1f")  # found: YAML's reader error spans two lines
def test_config_bytes(tmp_path: Path, content: bytes) -> None:
    path = write(tmp_path, ".yaml", content, name="config")
    try:
        load_config(path)
    except TunelabError as e:
        assert "\n" not in str(e), str(e)


@SETTINGS
@given(task=st.sampled_from(TASK_NAMES), suffix=st.sampled_from(FORMATS), content=st.binary(max_size=200))
@example(task="question-answering", suffix=".json", content=b"\xff")  # found: UnicodeDecodeError
@example(task="question-answering", suffix=".json", content=b"[" * 5000)  # found: RecursionError
def test_task_read_bytes(tmp_path: Path, task: str, suffix: str, content: bytes) -> None:
    path = write(tmp_path, suffix, content)
    reader = TASKS[task](task_config(task, "auto"))
    refused_well(lambda: reader.read(str(path)), str(path))


@SETTINGS
@given(table=st.lists(st.fixed_dictionaries({"text": json_values, "label": json_values}), max_size=6),
       labels=st.none() | st.lists(st.sampled_from(["neg", "pos", "a\nb", "None"]), min_size=2, max_size=3,
                                   unique=True), suffix=st.sampled_from([".jsonl", ".csv"]))  # fmt: skip
@example(table=[{"text": "a", "label": "x\ny"}, {"text": "b", "label": "z"}], labels=None, suffix=".jsonl")
@example(
    table=[{"text": "a", "label": []}], labels=["a\nb", "None"], suffix=".csv"
)  # found: a label with a newline
def test_classification_label_set(tmp_path: Path, table: list[dict[str, Any]], labels: list[str] | None,
                                  suffix: str) -> None:  # fmt: skip
    """Past reading: fixing the label set and mapping every row's label to its id."""
    path = as_file(tmp_path, table, suffix)
    task = TASKS["classification"](
        load_config(task="classification", data={"train": str(path), "labels": labels})
    )

    def label_ids() -> None:
        for split in task.load_tables():
            if split is not None:
                task.label_ids(split)

    refused_well(label_ids, str(path))
