"""The Arrow token cache (data.cache): reuse, keys, equality with the in-memory path, crash
safety, and the row-numbered errors of the chunked reading."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from tests.conftest import sentiment_rows, write_csv, write_tiny_bert
from tunelab import train
from tunelab.chunks import iter_tables
from tunelab.config import Config
from tunelab.data import read_table
from tunelab.errors import DataError
from tunelab.tasks import TASKS, arrow_splits
from tunelab.token_cache import EncodedRows, row_lengths, tokens_root


@pytest.fixture(scope="module")
def tokenizer(tiny_bert: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_bert)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows the cache build sends to the tokenizer (counted at `encode_texts`)."""
    seen: list[int] = []
    original = arrow_splits.encode_texts

    def counting(tokenizer: Any, texts: list[str], *args: Any) -> list[dict]:
        seen.append(len(texts))
        return original(tokenizer, texts, *args)

    monkeypatch.setattr(arrow_splits, "encode_texts", counting)
    return seen


def config(
    model: Path, train_file: Path, cache: bool = True, task: str = "classification", **data: Any
) -> Config:
    c = Config(model=str(model), task=task)
    c.data.train, c.data.cache = str(train_file), cache
    for key, value in data.items():
        setattr(c.data, key, value)
    return c


def splits(c: Config, tokenizer: Any) -> tuple[Any, Any]:
    task = TASKS[c.task](c)
    return task, task.load_splits(tokenizer)


def test_second_load_reuses_the_cache_without_tokenizing(tiny_bert, tokenizer, tmp_path, calls, capsys):
    data = write_csv(tmp_path / "train.csv", sentiment_rows(60, seed=11))
    _, first = splits(config(tiny_bert, data), tokenizer)
    assert sum(calls) >= 60 and isinstance(first.train, EncodedRows)
    calls.clear()
    task, second = splits(config(tiny_bert, data), tokenizer)
    assert calls == []
    assert "data: cached tokens reused from" in capsys.readouterr().err
    assert list(second.train) == list(first.train) and task.labels == ["negative", "positive"]
    assert row_lengths(second.train) == [len(e["input_ids"]) for e in second.train]
    # a resume's config names the labels the first run found: the same entry serves it
    task, resumed = splits(config(tiny_bert, data, labels=["negative", "positive"]), tokenizer)
    assert calls == [] and task.labels_from == "data.labels" and list(resumed.train) == list(first.train)


def test_key_follows_the_data_max_length_and_tokenizer(tiny_bert, tokenizer, tmp_path, calls):
    data = write_csv(tmp_path / "train.csv", sentiment_rows(40, seed=12))
    splits(config(tiny_bert, data), tokenizer)
    entries = set(tokens_root().iterdir())
    changed = sentiment_rows(40, seed=12)
    changed[5]["text"] = "good good good"
    write_csv(data, changed)  # the same path, other contents
    splits(config(tiny_bert, data), tokenizer)
    splits(config(tiny_bert, data, max_length=8), tokenizer)
    other = write_tiny_bert(tmp_path / "other-bert", extra_words=["extra"])
    _, out = splits(config(other, data), AutoTokenizer.from_pretrained(other))
    assert len(set(tokens_root().iterdir()) - entries) == 3
    assert max(row_lengths(out.train)) > 0
    calls.clear()
    splits(config(tiny_bert, data, max_length=8), tokenizer)  # each is reused in turn
    assert calls == []


@pytest.mark.parametrize(
    "task, data",
    [
        ("classification", {"max_train_samples": 30, "max_eval_samples": 7}),
        ("classification", {"shots_per_class": 4, "with_test": True}),
        ("classification", {"pairs": True, "labels": ["positive", "negative"]}),
        ("classification", {"multi_label": True, "max_length": 6}),
        ("regression", {"max_eval_samples": 9}),
    ],
)
def test_cached_rows_equal_the_in_memory_rows(tiny_bert, tokenizer, tmp_path, task, data):
    rows = sentiment_rows(90, seed=13)
    for i, row in enumerate(rows):
        row["pair"] = rows[-1 - i]["text"]
        row["score"] = str(i % 7 / 2)
        row["tags"] = row["label"] + ("|neutral" if i % 3 == 0 else "")
    folder = tmp_path / "files"
    folder.mkdir()
    data = dict(data)
    if data.pop("with_test", False):
        data["test"] = str(write_csv(folder / "test.csv", rows[:20]))
    if data.pop("pairs", False):
        data["text_pair_column"] = "pair"
    if task == "regression":
        data["label_column"] = "score"
    multi = data.pop("multi_label", False)
    if multi:
        data["label_column"] = "tags"
    train_file = write_csv(folder / "train.csv", rows)
    out = {}
    for cache in (False, True, True):
        c = config(tiny_bert, train_file, cache, task, **data)
        c.classification.multi_label = multi
        t, s = splits(c, tokenizer)
        out.setdefault(cache, []).append(
            (t.labels, [list(getattr(s, n) or []) for n in ("train", "validation", "test")])
        )
    assert out[False][0] == out[True][0] == out[True][1]
    assert len(out[True][0][1][0]) > 0


def test_training_metrics_equal_with_and_without_the_cache(tiny_bert, tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    data = write_csv(files / "train.csv", sentiment_rows(120, seed=14))
    results = []
    for cache in ("false", "true"):
        run = train(model=str(tiny_bert), method="full", output_dir=str(tmp_path / f"run-{cache}"),
                    train=str(data), max_steps=6, eval_steps=3, progress_bar=False, precision="fp32",
                    overrides=[f"data.cache={cache}"])  # fmt: skip
        lines = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
        report = json.loads((run.path / "eval.json").read_text())
        results.append(
            ([{k: v for k, v in e.items() if "per_s" not in k} for e in lines], report["validation"])
        )
    assert results[0] == results[1]


def test_a_half_written_entry_is_ignored_and_a_crash_leaves_none(
    tiny_bert, tokenizer, tmp_path, calls, monkeypatch
):
    data = write_csv(tmp_path / "train.csv", sentiment_rows(30, seed=15))
    _, built = splits(config(tiny_bert, data), tokenizer)
    entry = next(p for p in tokens_root().iterdir() if (p / "meta.json").is_file() and
                 json.loads((p / "meta.json").read_text())["files"]["train"] == str(data))  # fmt: skip
    expected = list(built.train)
    # a crash after writing the split files but before meta.json: the entry is rebuilt, not read
    (entry / "meta.json").unlink()
    shutil.copytree(entry, entry.parent / f".{entry.name}.partial-1-dead")
    calls.clear()
    _, rebuilt = splits(config(tiny_bert, data), tokenizer)
    assert sum(calls) >= 30 and list(rebuilt.train) == expected and (entry / "meta.json").is_file()

    def crash(*args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(arrow_splits, "_tokenize", crash)
    other = write_csv(tmp_path / "other.csv", sentiment_rows(30, seed=16))
    before = {p.name for p in tokens_root().iterdir()}
    with pytest.raises(KeyboardInterrupt):
        splits(config(tiny_bert, other), tokenizer)
    assert {p.name for p in tokens_root().iterdir()} == before  # no entry, no temporary folder left


def test_chunks_read_as_the_whole_file_and_bad_rows_keep_their_line(tiny_bert, tokenizer, tmp_path):
    rows = sentiment_rows(2500, seed=17)
    csv_file = write_csv(tmp_path / "train.csv", rows)
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" + ("\n" if i == 7 else "") for i, r in enumerate(rows)))
    parquet = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    for path in (csv_file, jsonl, parquet):
        whole = read_table(path)
        chunks = list(iter_tables(path, chunk_rows=700))
        assert len(chunks) > 1
        assert [r for c in chunks for r in c.rows] == whole.rows
        assert [c.where(i) for c in chunks for i in range(len(c))] == [
            whole.where(i) for i in range(len(whole))
        ]
    rows[2300]["label"] = " "
    with open(csv_file, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    validation = write_csv(tmp_path / "validation.csv", sentiment_rows(20, seed=18))
    lines = validation.read_text().splitlines()
    lines[9] = "good film,mixed"
    validation.write_text("\n".join(lines) + "\n")
    for path, message in ((csv_file, f"{csv_file}:2302: column 'label' has no label; fill it in"),
                          (None, f"{validation}:10: label 'mixed' never appears in the training data")):  # fmt: skip
        for cache in (False, True):
            c = config(tiny_bert, path or write_csv(tmp_path / "ok.csv", sentiment_rows(200)), cache,
                       validation=None if path else str(validation))  # fmt: skip
            with pytest.raises(DataError, match="^" + message.replace(".", r"\.")):
                splits(c, tokenizer)


@settings(max_examples=80, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(
    content=st.text(alphabet='ab,"\t\n {}:[]1\\', max_size=80),
    suffix=st.sampled_from([".csv", ".tsv", ".jsonl"]),
)
def test_chunked_reading_matches_reading_the_whole_file(tmp_path, content, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_text(content, encoding="utf-8")

    def outcome(tables: Any) -> Any:
        try:
            read = list(tables())
        except DataError as e:
            return str(e)
        return (
            [r for t in read for r in t.rows],
            [t.where(i) for t in read for i in range(len(t))],
            read[0].columns,
        )

    assert outcome(lambda: [read_table(path)]) == outcome(lambda: iter_tables(path, chunk_rows=2))
