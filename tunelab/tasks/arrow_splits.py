"""Classification and regression splits through the Arrow token cache (`tunelab.token_cache`).

The files are read in chunks (`tunelab.chunks`): each chunk is checked with the task's own
row checks (the same one-line errors, with the row's line), its texts are written to a
temporary Arrow file and its labels kept as one small integer (or number) per row. The
splits (`validation_split`, few-shot, `max_*_samples`) are then chosen in index space with
the same seeded draws as `data.stratified_split`, `data.shots` and `data.sample`, so the rows
equal today's in-memory path (`data.cache=false`) row for row. `datasets`' `map` tokenizes
each split (`data.num_workers` processes) into the cache entry, which later runs read back
memory-mapped.
"""

from __future__ import annotations

import dataclasses
import os
import random
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from tunelab.chunks import iter_tables
from tunelab.config import max_length
from tunelab.console import say
from tunelab.data import read_table, shown
from tunelab.errors import DataError
from tunelab.tasks.base import Splits, encode_splits, encode_texts
from tunelab.token_cache import LENGTH, build_entry, cache_key, file_digest, load_entry, tokenizer_digest

# data keys that do not change the encoded rows (the files enter the key by their contents)
NOT_IN_KEY = {
    "train",
    "validation",
    "test",
    "check",
    "cache",
    "num_workers",
    "pad_to_multiple_of",
    "labels",
    "streaming",
    "shuffle_buffer",
}


@dataclass
class RawFile:
    """One data file after the chunked pass: its texts in an Arrow file, one label code (or
    regression value) per row, and what each code stands for."""

    path: str
    arrow: Path
    rows: int = 0
    codes: array = field(default_factory=lambda: array("i"))  # classification: index into `names`
    values: array = field(default_factory=lambda: array("d"))  # regression: the number
    names: list[tuple[str, ...]] = field(default_factory=list)  # each code's label names, in row order
    index: dict[tuple[str, ...], int] = field(default_factory=dict)


def cached_classification_splits(task: Any, tokenizer: Any) -> Splits:
    """`load_splits` of classification and regression with `data.cache` on: the encoded splits
    from the cache entry of these files, tokenizer and settings, built first when missing."""
    config, d = task.config, task.config.data
    if not d.train:
        raise DataError("no training data: set data.train=<file> (CSV, TSV, JSON, JSONL or Parquet)")
    tokenizer_key = tokenizer_digest(tokenizer)
    if d.augment.method != "none" or tokenizer_key is None:
        # augmentation rewrites whole tables, and a tokenizer without files or vocabulary cannot
        # be told apart from another: the in-memory path
        return encode_splits(task, task.load_tables(), tokenizer, task.augment)
    files = {role: path for role, path in (("train", d.train), ("validation", d.validation), ("test", d.test))
             if path}  # fmt: skip
    given = list(task.labels) if task.labels is not None else None
    parts = {
        "task": task.name,
        "seed": config.seed,
        "multi_label": task.multi_label,
        "max_length": max_length(config),
        "data": {k: v for k, v in dataclasses.asdict(d).items() if k not in NOT_IN_KEY},
        "files": {role: _digest(path, d.format) for role, path in files.items()},
        "tokenizer": tokenizer_key,
    }
    key = cache_key({**parts, "labels": given})
    found = load_entry(key)
    if found is None and given is not None:  # a resume: the labels now given are those the entry found
        found = load_entry(cache_key({**parts, "labels": None}))
        found = found if found is not None and found[2]["labels"] == given else None
    if found is None:
        build_entry(key, lambda tmp: _build(task, tokenizer, key, tmp))
        found = load_entry(key)
        assert found is not None  # just built
        _tell(f"data: tokens cached in {found[0]} (later runs on the same data reuse them)")
    else:
        _tell(f"data: cached tokens reused from {found[0]}")
    folder, rows, meta = found
    task.labels = list(meta["labels"])
    task.labels_from = "train" if given is None else "data.labels"
    return Splits(train=rows["train"], validation=rows["validation"], test=rows.get("test"),  # type: ignore[arg-type]
                  files=files)  # fmt: skip


def _tell(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every process loads; one says so
        say(message)


def _digest(path: str, fmt: str) -> str:
    if not Path(path).is_file():
        read_table(path, fmt)  # raises the reader's message (not found, a folder, ...)
    return file_digest(path)


def _build(task: Any, tokenizer: Any, key: str, tmp: Path) -> dict[str, Any]:
    """Write the entry's split files into `tmp`; return its meta."""
    d, seed = task.config.data, task.config.seed
    tmp.mkdir(parents=True)
    task.labels_from = "train" if task.labels is None else "data.labels"
    train = read_raw(task, d.train, tmp / "raw-train.arrow")
    if task.name != "regression":
        task.fix_labels(Path(d.train), {n for names in train.names for n in names})
    strata = _strata(task, train)
    if d.validation:
        validation = read_raw(task, d.validation, tmp / "raw-validation.arrow")
        train_idx, val_idx = np.arange(train.rows), np.arange(validation.rows)
    else:
        validation = train
        train_idx, val_idx = stratified_indices(strata(np.arange(train.rows)), d.validation_split, seed)
        if not len(val_idx):
            raise DataError(
                f"{d.train}: too few rows to hold out a validation set ({len(train_idx)} rows, every class "
                f"needs 2+); give data.validation=<file> or add rows"
            )
    if d.shots_per_class:
        train_idx = shot_indices(train_idx, strata(train_idx), d.shots_per_class, seed)
    train_idx = sample_indices(train_idx, d.max_train_samples, seed)
    val_idx = sample_indices(val_idx, d.max_eval_samples, seed)
    chosen = [("train", train, train_idx), ("validation", validation, val_idx)]
    if d.test:
        test = read_raw(task, d.test, tmp / "raw-test.arrow")
        chosen.append(("test", test, sample_indices(np.arange(test.rows), d.max_eval_samples, seed)))
    for _, raw, idx in chosen:
        _refuse_unknown(task, raw, idx)
    written = {name: _tokenize(task, tokenizer, raw, idx, tmp / f"{name}.arrow", f"{key}-{name}")
               for name, raw, idx in chosen}  # fmt: skip
    for raw_file in tmp.glob("raw-*.arrow"):
        raw_file.unlink()
    return {"splits": written, "labels": task.labels, "rows": {name: len(idx) for name, _, idx in chosen},
            "files": {name: raw.path for name, raw, _ in chosen}}  # fmt: skip


def read_raw(task: Any, path: str, out: Path) -> RawFile:
    """Read and check one file chunk by chunk: texts to the Arrow file `out`, labels to codes."""
    d = task.config.data
    raw = RawFile(path, out)
    regression = task.name == "regression"
    fields = [pa.field("text", pa.string())] + (
        [pa.field("text_pair", pa.string())] if d.text_pair_column else []
    )
    fields.append(pa.field("value", pa.float64()) if regression else pa.field("code", pa.int32()))
    schema = pa.schema(fields)
    with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for chunk in iter_tables(path, d.format):
            names = task.check(chunk)
            columns: list[Any] = [[str(r[d.text_column]) for r in chunk.rows]]
            if d.text_pair_column:
                columns.append([str(r[d.text_pair_column]) for r in chunk.rows])
            if regression:
                values = [float(n[0]) for n in names]
                raw.values.extend(values)
                columns.append(values)
            else:
                codes = [_code(raw, tuple(n)) for n in names]
                raw.codes.extend(codes)
                columns.append(codes)
            writer.write_batch(pa.record_batch(columns, schema=schema))
            raw.rows += len(chunk)
    return raw


def _code(raw: RawFile, names: tuple[str, ...]) -> int:
    code = raw.index.get(names)
    if code is None:
        code = raw.index[names] = len(raw.names)
        raw.names.append(names)
    return code


def _strata(task: Any, raw: RawFile) -> Callable[[np.ndarray], tuple[np.ndarray, list[str]]]:
    """What splits and few-shot draws keep balanced, for a set of rows: (a key code per row, each
    code's key as `task.strata` spells it). Classification: the label set; regression: the
    value's quintile among those rows."""
    if task.name == "regression":
        values = np.frombuffer(raw.values, dtype=np.float64)

        def quintiles(idx: np.ndarray) -> tuple[np.ndarray, list[str]]:
            chosen = values[idx]
            edges = np.quantile(chosen, [0.2, 0.4, 0.6, 0.8]) if len(chosen) else []
            return np.searchsorted(edges, chosen), [str(k) for k in range(5)]

        return quintiles
    spelled = ["|".join(sorted(names)) for names in raw.names]
    keys = sorted(set(spelled))
    of_code = np.array([keys.index(s) for s in spelled], dtype=np.int64)
    codes = np.frombuffer(raw.codes, dtype=np.int32)
    return lambda idx: (of_code[codes[idx]], keys)


def _groups(keys: np.ndarray, spelled: list[str], rng: random.Random) -> list[list[int]]:
    """`data._shuffled_groups` in index space: positions grouped by key (keys in the order of
    their spelling), each group shuffled by `rng`."""
    groups = []
    for code in sorted(set(keys.tolist()), key=lambda c: spelled[c]):
        group = np.flatnonzero(keys == code).tolist()
        rng.shuffle(group)
        groups.append(group)
    return groups


def stratified_indices(
    strata: tuple[np.ndarray, list[str]], share: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """`data.stratified_split` over row numbers: (rest, held_out)."""
    rng = random.Random(seed)
    held: list[int] = []
    for group in _groups(*strata, rng):
        k = round(len(group) * share)
        k = min(max(k, 1), len(group) - 1) if len(group) > 1 else 0
        held += group[:k]
    mask = np.ones(len(strata[0]), dtype=bool)
    mask[held] = False
    return np.flatnonzero(mask), np.sort(np.array(held, dtype=np.int64))


def shot_indices(
    idx: np.ndarray, strata: tuple[np.ndarray, list[str]], per_key: int, seed: int
) -> np.ndarray:
    """`data.shots` over the rows `idx`."""
    rng = random.Random(seed)
    chosen: list[int] = []
    for group in _groups(*strata, rng):
        chosen += group[:per_key]
    rng.shuffle(chosen)
    return idx[np.array(chosen, dtype=np.int64)]


def sample_indices(idx: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """`data.sample` over the rows `idx`: at most n, by a seeded shuffle."""
    if n is None or n >= len(idx):
        return idx
    order = list(range(len(idx)))
    random.Random(seed).shuffle(order)
    return idx[np.array(order[:n], dtype=np.int64)]


def _refuse_unknown(task: Any, raw: RawFile, idx: np.ndarray) -> None:
    """A chosen row with a label outside the label set: the first one, by its line."""
    if not raw.names:
        return
    known = set(task.labels)
    unknown = [next((n for n in names if n not in known), None) for names in raw.names]
    bad = np.array([u is not None for u in unknown])[np.frombuffer(raw.codes, dtype=np.int32)[idx]]
    if bad.any():
        row = int(idx[int(np.argmax(bad))])
        name = unknown[raw.codes[row]]
        raise DataError(f"{_where(task, raw.path, row)}: label '{shown(name)}' {task._outside()}")


def _where(task: Any, path: str, row: int) -> str:
    """Where row number `row` of a file stands (read again: only on an error)."""
    seen = 0
    for chunk in iter_tables(path, task.config.data.format):
        if row < seen + len(chunk):
            return chunk.where(row - seen)
        seen += len(chunk)
    return path


def _tokenize(
    task: Any, tokenizer: Any, raw: RawFile, idx: np.ndarray, out: Path, fingerprint: str
) -> list[str]:
    """Tokenize the rows `idx` of a raw file into `out` (shards `out_0000N_of_...` with several
    workers); returns the written file names."""
    import datasets  # imported where used, as in token_cache (about a second and 90 MB)

    d = task.config.data
    length, pairs = max_length(task.config), bool(d.text_pair_column)
    regression = task.name == "regression"
    labels = [] if regression else [task.label_of(list(names)) for names in raw.names]

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        examples = encode_texts(tokenizer, batch["text"], batch["text_pair"] if pairs else None, length)
        out: dict[str, list[Any]] = {k: [e[k] for e in examples] for k in examples[0]} if examples else {}
        out["labels"] = batch["value"] if regression else [labels[c] for c in batch["code"]]
        out[LENGTH] = [len(ids) for ids in out.get("input_ids", [])]
        return out

    tokens = datasets.List(datasets.Value("int32"))
    label = (datasets.Value("float64") if regression else
             datasets.List(datasets.Value("float64")) if task.multi_label else datasets.Value("int64"))  # fmt: skip
    keys = encode_texts(tokenizer, ["a"], ["b"] if pairs else None, length)[0]  # which id lists it makes
    features = datasets.Features(
        {**dict.fromkeys(keys, tokens), "labels": label, LENGTH: datasets.Value("int32")}
    )
    source = datasets.Dataset.from_file(str(raw.arrow))
    if not np.array_equal(idx, np.arange(source.num_rows)):
        source = source.select(idx)
    workers = task.config.data.num_workers
    encoded = source.map(encode, batched=True, remove_columns=source.column_names, features=features,
                         num_proc=workers if workers > 1 and len(idx) > 1000 else None,
                         cache_file_name=str(out), new_fingerprint=fingerprint)  # fmt: skip
    return [Path(f["filename"]).name for f in encoded.cache_files]
