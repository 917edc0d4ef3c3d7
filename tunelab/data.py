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
from collections.abc import Iterator
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


def read_table(path: str | Path, fmt: str = "auto", keep_blank: bool = False) -> Table:
    """Read a data file into a Table. With `keep_blank`, blank lines of CSV, TSV and text files
    stay as rows with empty cells (prediction keeps one output per input line).

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
    table = reader(path, fmt, keep_blank)
    if not table.rows:
        raise DataError(f"{path}: the file has no data rows")
    return table


def shown(name: Any) -> str:
    """A column name or cell as a message shows it: as it is when printable, else quoted and
    escaped (a newline inside a quoted header must not break the one-line message)."""
    text = str(name)
    return text if text.isprintable() else repr(text)


def shown_list(columns: list[Any]) -> str:
    return ", ".join(shown(c) for c in columns)


def _check_header(path: Path, header: list[str]) -> None:
    """A duplicated column name would silently shadow one of the two columns: refuse it."""
    seen: dict[str, int] = {}
    for number, name in enumerate(header, 1):
        if name in seen:
            what = f"column {name!r}" if name else "an unnamed column"
            raise DataError(
                f"{path}:1: {what} appears twice in the header (columns {seen[name]} and {number}); "
                f"rename or remove one of them"
            )
        seen[name] = number


def wrong_fields(
    path: Path, fmt: str, header: list[str], record: list[str], first: int, end: int
) -> DataError:
    """The error for a CSV/TSV record (lines `first`..`end`) whose field count is not the header's."""
    if end > first:
        fix = f"the row runs on to line {end}: check for an unclosed quote on line {first}"
    elif fmt == "csv":
        fix = "quote fields that contain commas"
    else:
        fix = "a TSV field may not contain a tab"
    return DataError(
        f"{path}:{first}: expected {len(header)} fields ({shown_list(header)}), found {len(record)}; {fix}"
    )


def delimited_rows(path: Path, fmt: str, keep_blank: bool = False) -> Iterator[Any]:
    """A CSV/TSV file read as it goes (the whole-file and the chunked readers share it): first its
    checked header (a list of names), then (first line, row) for each record; blank records are
    skipped, or given as empty rows with `keep_blank`. One-line errors for a missing or bad header,
    a record with the wrong number of fields, malformed quoting and non-UTF-8 files."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else csv.reader(f)
        try:
            header = next(reader, None)
            if not header or not any(h.strip() for h in header):
                raise DataError(f"{path}: the first line must be a header naming the columns")
            header = [h.strip() for h in header]
            _check_header(path, header)
            yield header
            end = reader.line_num  # a quoted CSV field may span lines: a record is lines first..end
            for record in reader:
                first, end = end + 1, reader.line_num
                if not record or (len(record) == 1 and not record[0].strip()):
                    if keep_blank:
                        yield first, dict.fromkeys(header, "")
                    continue
                if len(record) != len(header):
                    raise wrong_fields(path, fmt, header, record, first, end)
                yield first, dict(zip(header, record))
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: malformed {fmt.upper()} ({e})") from None
        except UnicodeDecodeError:
            raise not_utf8(path) from None


def _read_delimited(path: Path, fmt: str, keep_blank: bool = False) -> Table:
    records = delimited_rows(path, fmt, keep_blank)
    header: list[str] = next(records)
    read = list(records)
    return Table(path, [row for _, row in read], [f"line {first}" for first, _ in read], header)


def _read_text(path: Path, fmt: str, keep_blank: bool = False) -> Table:
    """Plain text: each non-blank line is one document (column `text`); blank lines too with `keep_blank`."""
    rows, lines = [], []
    try:
        with open(path, encoding="utf-8-sig") as f:
            for number, line in enumerate(f, 1):
                if line.strip() or keep_blank:
                    rows.append({"text": line.rstrip("\r\n")})
                    lines.append(f"line {number}")
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    return Table(path, rows, lines, ["text"])


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows[:1000]:
        seen.update(dict.fromkeys(row))
    return list(seen)


def not_utf8(path: Path) -> DataError:
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


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object hook: a key given twice would silently keep only its last value."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def _duplicate(where: str, key: str) -> DataError:
    return DataError(f"{where}: key '{key}' appears twice in one object; keep one of the two")


def _read_json(path: Path, fmt: str, keep_blank: bool = False) -> Table:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise _duplicate(str(path), e.key) from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read; flatten the rows") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise not_utf8(path) from None
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


def jsonl_row(path: Path, n: int, line: str) -> dict[str, Any]:
    """Line `n` of a JSONL file as its object, or a DataError naming the line (and column)."""
    try:
        row = json.loads(line, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise _duplicate(f"{path}:{n}", e.key) from None
    except RecursionError:
        raise DataError(f"{path}:{n}: JSON nested too deeply to read; flatten the row") from None
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{n}:{e.colno}: not valid JSON ({e.msg}); each line must be one JSON object"
        ) from None
    if not isinstance(row, dict):
        raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
    return row


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file, read as it goes (the whole-file
    and the chunked readers share it); one-line errors for bad JSON and non-UTF-8 files."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield n, jsonl_row(path, n, line)
    except UnicodeDecodeError:
        raise not_utf8(path) from None


def _read_jsonl(path: Path, fmt: str, keep_blank: bool = False) -> Table:
    read = list(jsonl_rows(path))
    rows = [row for _, row in read]
    return Table(path, rows, [f"line {n}" for n, _ in read], _columns(rows))


def _read_parquet(path: Path, fmt: str, keep_blank: bool = False) -> Table:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    return Table(path, rows, [f"row {i + 1}" for i in range(len(rows))], _columns(rows))


def refuse_blank_rows(path: str | Path) -> None:
    """For `predict --file` on layouts that cannot answer a blank row (prompts, questions):
    refuse it by its line, since skipping it would shift every later answer off its row.
    Only CSV, TSV and text files have blank rows (read by their extension)."""
    path = Path(path)
    if not path.is_file() or path.suffix.lower() not in (".csv", ".tsv", ".txt"):
        return
    table = read_table(path, keep_blank=True)
    for i, row in enumerate(table.rows):
        if all(is_missing(v) for v in row.values()):
            raise DataError(
                f"{table.where(i)}: a blank row; predict --file answers every row in order, so fill it in "
                f"or remove it"
            )


# the flags of `eval` and `predict` that set a run's column keys (the run's config is fixed)
COLUMN_FLAGS = {
    "data.text_column": "--text-column",
    "data.text_pair_column": "--text-pair-column",
    "data.label_column": "--label-column",
}


def require_columns(table: Table, columns: list[str], key_of: dict[str, str], flags: bool = False) -> None:
    """Raise a DataError naming the config key (or, with `flags`, the command-line flag of
    `eval` / `predict` that sets it) when a column is missing."""
    for column in columns:
        if column not in table.columns:
            near = [c for c in table.columns if c.lower() == column.lower()]
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            key = key_of[column]
            fix = f"give {COLUMN_FLAGS[key]} <column name>" if flags and key in COLUMN_FLAGS else (
                f"set {key}=<column name>")  # fmt: skip
            raise DataError(
                f"{table.path}: no column {column!r}{hint}; the file has: {shown_list(table.columns)}. "
                f"{fix[0].upper()}{fix[1:]}"
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


def write_rows(path: str | Path, rows: list[dict[str, Any]], columns: list[str], fmt: str = "auto") -> None:
    """Write rows as CSV, TSV, JSON or JSONL, picked by the extension unless `fmt` says (for
    inspection files)."""
    path = Path(path)
    fmt = detect_format(path, fmt)
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
