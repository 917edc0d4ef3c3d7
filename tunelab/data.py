"""Reading the user's data files into rows, with errors that name the file, line and column.

Formats: CSV, TSV (no quoting, as GLUE ships it), JSON (a list of objects), JSONL, Parquet
and plain text (one document per line). Every row remembers where it came from (`file:line`
for text formats, `file: row N` for JSON and Parquet), so a task's validation can point at
the exact place to fix.
"""

from __future__ import annotations

import csv
import json
import math
import random
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import DataError

FORMATS = {
    ".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet", ".txt": "text",
}  # fmt: skip


@dataclass
class Table:
    """Rows of one file: plain dicts, plus where each row stands in the file."""

    path: Path
    rows: list[dict[str, Any]]
    lines: list[str]  # "line 17" or "row 3", parallel to rows
    columns: list[str]

    def where(self, i: int) -> str:
        return (
            f"{self.path}:{self.lines[i].removeprefix('line ')}"
            if self.lines[i].startswith("line ")
            else f"{self.path} ({self.lines[i]})"
        )

    def subset(self, indices: list[int]) -> Table:
        return Table(
            self.path, [self.rows[i] for i in indices], [self.lines[i] for i in indices], self.columns
        )

    def __len__(self) -> int:
        return len(self.rows)


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataError(
            f"{path}: cannot tell the format from the extension '{suffix}'; rename the file to one of "
            f"{', '.join(FORMATS)} or set data.format"
        )
    return FORMATS[suffix]


def read_table(path: str | Path, fmt: str = "auto") -> Table:
    """Read a data file into a Table.

    Raises:
        DataError: the file is missing, empty, or malformed (with the line number).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"data file not found: {path} (check the path; it is read relative to "
            f"the current directory {Path.cwd()})"
        )
    if path.is_dir():
        raise DataError(f"{path} is a folder; give the data file inside it")
    fmt = detect_format(path, fmt)
    if fmt != "parquet" and path.stat().st_size == 0:
        need = "a header line and at least one row" if fmt in ("csv", "tsv") else "at least one example"
        raise DataError(f"{path}: the file is empty; it needs {need}")
    reader = {
        "csv": _read_delimited,
        "tsv": _read_delimited,
        "json": _read_json,
        "jsonl": _read_jsonl,
        "parquet": _read_parquet,
        "text": _read_text,
    }[fmt]
    table = reader(path, fmt)
    if not table.rows:
        raise DataError(f"{path}: the file has no data rows")
    return table


def _read_delimited(path: Path, fmt: str) -> Table:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    rows, lines = [], []
    with open(path, newline="", encoding="utf-8-sig") as f:
        if fmt == "tsv":
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.reader(f)
        try:
            header = next(reader, None)
            if not header or not any(h.strip() for h in header):
                raise DataError(f"{path}: the first line must be a header naming the columns")
            header = [h.strip() for h in header]
            end = reader.line_num  # a quoted CSV field may span lines: a record is lines first..end
            for record in reader:
                first, end = end + 1, reader.line_num
                if not record or (len(record) == 1 and not record[0].strip()):
                    continue
                if len(record) != len(header):
                    if end > first:
                        fix = f"the row runs on to line {end}: check for an unclosed quote on line {first}"
                    elif fmt == "csv":
                        fix = "quote fields that contain commas"
                    else:
                        fix = "a TSV field may not contain a tab"
                    raise DataError(
                        f"{path}:{first}: expected {len(header)} fields "
                        f"({', '.join(header)}), found {len(record)}; {fix}"
                    )
                rows.append(dict(zip(header, record)))
                lines.append(f"line {first}")
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: malformed {fmt.upper()} ({e})") from None
        except UnicodeDecodeError:
            raise _not_utf8(path) from None
    return Table(path, rows, lines, header)


def _read_text(path: Path, fmt: str) -> Table:
    """Plain text: each non-blank line is one document (column `text`)."""
    rows, lines = [], []
    try:
        with open(path, encoding="utf-8-sig") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    rows.append({"text": line.rstrip("\r\n")})
                    lines.append(f"line {number}")
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    return Table(path, rows, lines, ["text"])


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows[:1000]:
        seen.update(dict.fromkeys(row))
    return list(seen)


def _not_utf8(path: Path) -> DataError:
    """Name the line and column of the first byte that is not UTF-8 (a decode error raised while
    streaming only knows its offset inside the current chunk)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - data.rfind(b"\n", 0, e.start)
        return DataError(
            f"{path}:{line}:{column}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8"
        )
    return DataError(f"{path}: not UTF-8 text; save the file as UTF-8")


def _read_json(path: Path, fmt: str) -> Table:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]} wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            data = lists[0]
    if not isinstance(data, list):
        raise DataError(
            f"{path}: expected a JSON list of objects (one per example), "
            f"got {type(data).__name__}; or use JSONL, one object per line"
        )
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path} (row {i + 1}): expected a JSON object, got {type(row).__name__}")
    return Table(path, data, [f"row {i + 1}" for i in range(len(data))], _columns(data))


def _read_jsonl(path: Path, fmt: str) -> Table:
    rows, lines = [], []
    try:
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}:{n}:{e.colno}: not valid JSON ({e.msg}); each line must be one JSON object"
                    ) from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
                lines.append(f"line {n}")
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    return Table(path, rows, lines, _columns(rows))


def _read_parquet(path: Path, fmt: str) -> Table:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    return Table(path, rows, [f"row {i + 1}" for i in range(len(rows))], _columns(rows))


def require_columns(table: Table, columns: list[str], key_of: dict[str, str]) -> None:
    """Raise a DataError naming the config key when a column is missing."""
    for column in columns:
        if column not in table.columns:
            near = [c for c in table.columns if c.lower() == column.lower()]
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise DataError(
                f"{table.path}: no column '{column}'{hint}; the file has: {', '.join(table.columns)}. "
                f"Set {key_of[column]}=<column name>"
            )


def is_missing(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, float) and math.isnan(value))
        or (isinstance(value, str) and not value.strip())
    )


def sample(table: Table, n: int | None, seed: int) -> Table:
    """At most n rows, chosen by a seeded shuffle (the order stays shuffled)."""
    if n is None or n >= len(table):
        return table
    order = list(range(len(table)))
    random.Random(seed).shuffle(order)
    return table.subset(order[:n])


def _shuffled_groups(keys: list[Any], rng: random.Random) -> list[list[int]]:
    """Row indices grouped by key (keys in a fixed order), each group shuffled by `rng`."""
    by_key: dict[Any, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        by_key[key].append(i)
    groups = []
    for key in sorted(by_key, key=str):
        rng.shuffle(by_key[key])
        groups.append(by_key[key])
    return groups


def stratified_split(table: Table, keys: list[Any], share: float, seed: int) -> tuple[Table, Table]:
    """Split into (rest, held_out) keeping each key's share; seeded. Every key with 2+ rows
    keeps at least one row on each side."""
    rng = random.Random(seed)
    held: list[int] = []
    for idx in _shuffled_groups(keys, rng):
        k = round(len(idx) * share)
        k = min(max(k, 1), len(idx) - 1) if len(idx) > 1 else 0
        held += idx[:k]
    held_set = set(held)
    rest = [i for i in range(len(table)) if i not in held_set]
    return table.subset(rest), table.subset(sorted(held))


def shots(table: Table, keys: list[Any], per_key: int, seed: int) -> Table:
    """Few-shot subset: `per_key` rows of every key (label), chosen by a seeded shuffle; keys
    with fewer rows keep all they have."""
    rng = random.Random(seed)
    chosen: list[int] = []
    for idx in _shuffled_groups(keys, rng):
        chosen += idx[:per_key]
    rng.shuffle(chosen)
    return table.subset(chosen)


def write_rows(path: str | Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Write rows as CSV, TSV, JSON or JSONL, picked by the extension (for inspection files)."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt in ("csv", "tsv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns, delimiter="\t" if fmt == "tsv" else ",",
                                    extrasaction="ignore", quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL,
                                    escapechar="\\" if fmt == "tsv" else None)  # fmt: skip
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    else:
        raise DataError(f"{path}: write augmented data as .csv, .tsv, .json or .jsonl")
