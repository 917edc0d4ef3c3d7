"""Reading a data file in chunks of rows, so that a million-row file never becomes a million
Python dicts at once.

`iter_tables` yields the file as a sequence of small `Table`s (the same rows, cells, positions
and errors as `data.read_table`, which reads the whole file): CSV and TSV through the `csv`
module, JSONL line by line, Parquet by pyarrow's record batches; a JSON list is read whole
(its parser has no streaming form) and cut into chunks. The tokenized-splits cache
(`tasks/arrow_splits.py`) validates and tokenizes one chunk at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunelab.data import Table, _columns, delimited_rows, detect_format, jsonl_rows, read_table
from tunelab.errors import DataError

CHUNK_ROWS = 8192  # rows per chunk: large enough for fast tokenizer batches, small in memory

CHUNKED_FORMATS = ("csv", "tsv", "jsonl", "parquet")


def iter_tables(path: str | Path, fmt: str = "auto", chunk_rows: int | None = None) -> Iterator[Table]:
    """The rows of a data file as consecutive `Table`s of at most `chunk_rows` rows (default
    `CHUNK_ROWS`; blank rows skipped, as `read_table` skips them). Every chunk carries the file's
    columns (JSONL: those of its first 1000 rows, so its first chunk holds at least 1000).

    Raises:
        DataError: as `read_table` does: the file is missing, empty, malformed (with the line
            number) or has no data rows.
    """
    path = Path(path)
    chunk_rows = chunk_rows or CHUNK_ROWS
    if not path.is_file() or path.stat().st_size == 0:
        yield from _whole(read_table(path, fmt), chunk_rows)  # read_table says what is wrong
        return
    fmt = detect_format(path, fmt)
    if fmt not in CHUNKED_FORMATS:
        yield from _whole(read_table(path, fmt), chunk_rows)
        return
    chunks = {"csv": _delimited, "tsv": _delimited, "jsonl": _jsonl, "parquet": _parquet}[fmt]
    empty = True
    for table in chunks(path, fmt, chunk_rows):
        if len(table):
            empty = False
            yield table
    if empty:
        raise DataError(f"{path}: the file has no data rows")


def _whole(table: Table, chunk_rows: int) -> Iterator[Table]:
    for start in range(0, len(table), chunk_rows):
        yield table.subset(list(range(start, min(start + chunk_rows, len(table)))))


def _delimited(path: Path, fmt: str, chunk_rows: int) -> Iterator[Table]:
    """`data._read_delimited`, one chunk at a time (the same messages)."""
    records = delimited_rows(path, fmt)
    header: list[str] = next(records)
    rows: list[dict[str, Any]] = []
    lines: list[str] = []
    for first, row in records:
        rows.append(row)
        lines.append(f"line {first}")
        if len(rows) == chunk_rows:
            yield Table(path, rows, lines, header)
            rows, lines = [], []
    yield Table(path, rows, lines, header)


def _jsonl(path: Path, fmt: str, chunk_rows: int) -> Iterator[Table]:
    """`data._read_jsonl`, one chunk at a time; the columns are those of the first 1000 rows, as there."""
    rows: list[dict[str, Any]] = []
    lines: list[str] = []
    columns: list[str] | None = None
    for n, row in jsonl_rows(path):
        rows.append(row)
        lines.append(f"line {n}")
        if len(rows) == max(chunk_rows, 1000 if columns is None else 0):
            columns = columns or _columns(rows)
            yield Table(path, rows, lines, columns)
            rows, lines = [], []
    yield Table(path, rows, lines, columns or _columns(rows))


def _parquet(path: Path, fmt: str, chunk_rows: int) -> Iterator[Table]:
    """Parquet by record batches; positions are "row N" as `data._read_parquet` gives them."""
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
        columns = list(file.schema_arrow.names)
        batches = file.iter_batches(batch_size=max(chunk_rows, 1))
        done = 0
        for batch in batches:
            rows = batch.to_pylist()
            yield Table(path, rows, [f"row {done + i + 1}" for i in range(len(rows))], columns)
            done += len(rows)
    except DataError:
        raise
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
