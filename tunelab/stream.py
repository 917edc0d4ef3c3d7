"""Streaming training data (`data.streaming: true`): train from a file larger than memory,
read lazily, without a pass over it first.

The training file is read a record at a time from a position (`FileRows`), each process keeps
its own share of the rows (row i goes to process i mod world), a seeded shuffle buffer of
`data.shuffle_buffer` rows mixes them, and `StreamSource` cuts the drawn rows into batches,
tokenizes them with the task's own `encode` as they are needed, and hands `fit` one optimizer
step at a time. A pass over the file is an epoch; the next pass shuffles anew.

Exact resume: `state_dict` records, per process, where the reader stands (byte offset and
line, or Parquet row group and row), the positions of the rows in the shuffle buffer and in
the batches already drawn, and the shuffle RNG. `load_state_dict` re-reads those rows from
their positions, so a resumed run draws exactly the batches an uninterrupted one would have.

What is hand-written, and why. Parquet is read with pyarrow (`ParquetFile.iter_batches`, a
record batch of one row group at a time; a resume opens the saved row group directly). The
line formats (CSV, TSV, JSONL, text) are read here, a record at a time from a byte offset:
pyarrow's streaming CSV and JSON readers report no byte offset to resume from (a resume would
parse the whole prefix again) and infer column types differently from tunelab's own reader
(tunelab.data, Python's csv module), so the same file would give other rows streamed than
loaded. Hugging Face `datasets` streaming (`IterableDataset.shuffle` + `state_dict`) drops the
shuffle buffer's contents on resume (it refills the buffer from later rows), so its resume is
not exact.
"""

from __future__ import annotations

import csv
import json
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any, BinaryIO

import torch.distributed as torch_dist

from tunelab.config import Config, batch_size
from tunelab.data import Table, _check_header, detect_format, sample, shown_list
from tunelab.dist import Dist
from tunelab.errors import ConfigError, DataError
from tunelab.tasks.base import Splits

BUCKET_BATCHES = 50  # length bucketing sorts windows of this many batches (as tunelab.loop.length_batches)
PARQUET_CHUNK = 1024  # rows of a Parquet row group decoded at a time

Position = tuple[int, int]  # (byte offset, line number) of a record; Parquet: (row group, row in group)


@dataclass
class Item:
    """One training row: where it starts in the file, its cells, and once tokenized, its example."""

    position: Position
    row: dict[str, Any]
    example: dict[str, Any] | None = None


class FileRows:
    """The records of a CSV, TSV, JSONL or text file, read one at a time from a byte offset."""

    def __init__(self, path: Path, fmt: str):
        self.path, self.fmt = path, fmt
        self.size = path.stat().st_size
        if self.size == 0:
            raise DataError(f"{path}: the file is empty; it needs {'a header line and ' * (fmt in ('csv', 'tsv'))}"
                            f"at least one row")  # fmt: skip
        self.columns, self.start = self._head()

    def _head(self) -> tuple[list[str], Position]:
        """The column names and the position of the first data record."""
        if self.fmt == "text":
            return ["text"], (0, 1)
        with open(self.path, "rb") as f:
            if self.fmt == "jsonl":
                for _, where, _, raw in self._records(f, (0, 1)):
                    return list(self.parse(raw, where)), (0, 1)
                raise DataError(f"{self.path}: the file has no data rows")
            header: list[str] | None = None
            lines = self._lines(f, (0, 1))
            try:
                header = next(self._reader(lines), None)
            except csv.Error as e:
                raise DataError(f"{self.path}:1: malformed {self.fmt.upper()} ({e})") from None
            if not header or not any(h.strip() for h in header):
                raise DataError(f"{self.path}: the first line must be a header naming the columns")
            header = [h.strip() for h in header]
            _check_header(self.path, header)
            return header, lines.position

    def _reader(self, lines: Any) -> Any:
        if self.fmt == "tsv":
            return csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
        return csv.reader(lines)

    def _lines(self, f: BinaryIO, at: Position) -> _Lines:
        return _Lines(f, at, self.path)

    def _records(self, f: BinaryIO, at: Position) -> Iterator[tuple[Position, str, Position, Any]]:
        """(position, "line N", position after it, raw record) of each data record from `at`."""
        lines = self._lines(f, at)
        if self.fmt in ("jsonl", "text"):
            for line in lines:
                start = lines.last
                if line.strip():
                    yield start, f"line {start[1]}", lines.position, line.rstrip("\r\n")
            return
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        reader = self._reader(lines)
        while True:
            begin = lines.position
            try:
                record = next(reader, None)
            except csv.Error as e:
                raise DataError(
                    f"{self.path}:{lines.position[1] - 1}: malformed {self.fmt.upper()} ({e})"
                ) from None
            if record is None:
                return
            if not record or (len(record) == 1 and not record[0].strip()):
                continue
            yield begin, f"line {begin[1]}", lines.position, record

    def records(self, at: Position) -> Iterator[tuple[Position, str, Position, Any]]:
        with open(self.path, "rb") as f:
            yield from self._records(f, at)

    def parse(self, raw: Any, where: str) -> dict[str, Any]:
        """A raw record as a row of cells (errors name the file and line)."""
        if self.fmt == "text":
            return {"text": raw}
        if self.fmt == "jsonl":
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{self.path}:{where.removeprefix('line ')}:{e.colno}: not valid JSON ({e.msg}); "
                                f"each line must be one JSON object") from None  # fmt: skip
            if not isinstance(row, dict):
                raise DataError(f"{self.path}:{where.removeprefix('line ')}: expected a JSON object, "
                                f"got {type(row).__name__}")  # fmt: skip
            return row
        if len(raw) != len(self.columns):
            raise DataError(f"{self.path}:{where.removeprefix('line ')}: expected {len(self.columns)} fields "
                            f"({shown_list(self.columns)}), found {len(raw)}")  # fmt: skip
        return dict(zip(self.columns, raw))

    def rows_at(self, positions: list[Position]) -> list[dict[str, Any]]:
        """The rows that start at `positions` (a resume rebuilding its shuffle buffer)."""
        out = []
        with open(self.path, "rb") as f:
            for at in positions:
                _, where, _, raw = next(self._records(f, at))
                out.append(self.parse(raw, where))
        return out

    def label(self, at: Position) -> str:
        return f"line {at[1]}"

    def fraction(self, at: Position) -> float:
        return (at[0] - self.start[0]) / max(1, self.size - self.start[0])


class _Lines:
    """Lines of a binary file from a byte offset, decoded, remembering the offset and line
    number reached (Python's csv module pulls one line at a time, so after each record they
    mark where the next one begins)."""

    def __init__(self, f: BinaryIO, at: Position, path: Path):
        self.f, self.path = f, path
        self.position = self.last = at
        f.seek(at[0])

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        raw = self.f.readline()
        if not raw:
            raise StopIteration
        offset, line = self.position
        self.last, self.position = self.position, (offset + len(raw), line + 1)
        try:
            return raw.decode("utf-8-sig" if offset == 0 else "utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{self.path}:{line}: not UTF-8 text; save the file as UTF-8") from None


class ParquetRows:
    """The rows of a Parquet file, a record batch of one row group at a time (pyarrow)."""

    def __init__(self, path: Path):
        import pyarrow.parquet as pq  # a dependency; imported here as tunelab.data does

        try:
            self.file = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        self.path = path
        self.columns = list(self.file.schema_arrow.names)
        meta = self.file.metadata
        self.group_rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.before = [0, *accumulate(self.group_rows)][:-1]  # rows before each row group
        self.total = max(1, meta.num_rows)
        self.start: Position = (0, 0)

    def _batches(self, group: int) -> Iterator[Any]:
        return self.file.iter_batches(batch_size=PARQUET_CHUNK, row_groups=[group])

    def records(self, at: Position) -> Iterator[tuple[Position, str, Position, Any]]:
        for group in range(at[0], len(self.group_rows)):
            row = 0
            for batch in self._batches(group):
                first = row
                row += batch.num_rows
                if row <= at[1] and group == at[0]:
                    continue
                cells = batch.to_pylist()
                for k, cell in enumerate(cells):
                    r = first + k
                    if group == at[0] and r < at[1]:
                        continue
                    yield (group, r), self.label((group, r)), (group, r + 1), cell

    def parse(self, raw: Any, where: str) -> dict[str, Any]:
        return raw

    def rows_at(self, positions: list[Position]) -> list[dict[str, Any]]:
        wanted: dict[int, set[int]] = {}
        for group, row in positions:
            wanted.setdefault(group, set()).add(row)
        found: dict[Position, dict[str, Any]] = {}
        for group, rows in sorted(wanted.items()):
            row = 0
            for batch in self._batches(group):
                picked = [r for r in range(row, row + batch.num_rows) if r in rows]
                if picked:
                    cells = batch.take([r - row for r in picked]).to_pylist()
                    found.update({(group, r): c for r, c in zip(picked, cells)})
                row += batch.num_rows
        return [found[p] for p in positions]

    def label(self, at: Position) -> str:
        return f"row {self.before[at[0]] + at[1] + 1}"

    def fraction(self, at: Position) -> float:
        return (self.before[at[0]] + at[1] if at[0] < len(self.before) else self.total) / self.total


def open_rows(path: str, fmt: str) -> FileRows | ParquetRows:
    """The streaming reader of the training file."""
    where = Path(path)
    if not where.is_file():
        raise DataError(f"data file not found: {where} (check the path; it is read relative to the current "
                        f"directory {Path.cwd()})")  # fmt: skip
    fmt = detect_format(where, fmt)
    if fmt == "parquet":
        return ParquetRows(where)
    if fmt not in ("csv", "tsv", "jsonl", "text"):
        raise DataError(f"{where}: data.streaming reads CSV, TSV, JSONL, text or Parquet, not {fmt}; "
                        f"convert the file (a JSON list to JSONL: one object per line)")  # fmt: skip
    return FileRows(where, fmt)


class StreamSource:
    """The training rows of one process, as optimizer steps for `fit` (see the module docstring).

    `steps()` yields, until the pass over the file ends, (examples, group, counted, lengths):
    this process's tokenized rows, its micro-batches as indices into them, and the global
    micro-batches of all processes as indices into `lengths` (their token counts), which the
    loop's counters read. Under torchrun a pass ends for all processes together, when the first
    one's share runs out (the others' remaining rows, at most a batch each, sit out that pass).
    """

    def __init__(self, config: Config, task: Any, tokenizer: Any, dist: Dist | None = None):
        d, t = config.data, config.train
        if not d.train:
            raise DataError("no training data: set data.train=<file> (CSV, TSV, JSONL, text or Parquet)")
        self.task, self.tokenizer, self.dist = task, tokenizer, dist or Dist()
        task.labels_from = "data.labels"  # (what a label outside them is told: the config requires them)
        self.rows = open_rows(d.train, d.format)
        task.check(Table(self.rows.path, [], [], self.rows.columns))  # the columns, before any training
        self.capacity = d.shuffle_buffer
        self.batch = batch_size(config)
        self.window = self.batch * (BUCKET_BATCHES if t.length_bucketing else 1)
        self.bucketing = t.length_bucketing
        self.accumulation = t.gradient_accumulation
        self.rng = random.Random(f"tunelab-stream:{config.seed}:{self.dist.rank}")
        self.pass_done = False
        self._restart()

    def _restart(self) -> None:
        """Back to the start of the file, with an empty buffer: a new pass."""
        self.position, self.index = self.rows.start, 0
        self.buffer: list[Item] = []
        self.queue: list[list[Item]] = []  # batches drawn, in the order they train
        self._records: Iterator[tuple[Position, str, Position, Any]] | None = None
        self._exhausted = False

    @property
    def held(self) -> int:
        """Rows held in memory: the shuffle buffer and the batches drawn from it."""
        return len(self.buffer) + sum(len(b) for b in self.queue)

    @property
    def fraction(self) -> float:
        """How far training is into the pass, 0 to 1: how far the reader is into the file, less
        the share of the rows read that are still held (in the buffer, or drawn and waiting)."""
        read = self.index / self.dist.world  # about this process's rows read so far
        return self.rows.fraction(self.position) * max(0.0, 1 - self.held / read) if read else 0.0

    # ------------------------------------------------------------------ reading and shuffling
    def _next_mine(self) -> Item | None:
        """The next row of this process's share, from the file; None at its end."""
        if self._exhausted:
            return None
        if self._records is None:
            self._records = self.rows.records(self.position)
        for start, where, after, raw in self._records:
            index = self.index
            self.position, self.index = after, index + 1
            if index % self.dist.world == self.dist.rank:
                return Item(start, self.rows.parse(raw, where))
        self._exhausted = True
        return None

    def draw(self) -> Item | None:
        """A row drawn at random from the shuffle buffer, which is topped up from the file first;
        None when the pass has no rows left."""
        while len(self.buffer) < self.capacity:
            item = self._next_mine()
            if item is None:
                break
            self.buffer.append(item)
        if not self.buffer:
            return None
        j = self.rng.randrange(len(self.buffer))
        self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        return self.buffer.pop()

    def _refill(self) -> None:
        """Draw the next batches into the queue: one batch, or with length bucketing a window of
        50 batches sorted by length, cut, and put in a random order (little padding, a random
        order across batches)."""
        items: list[Item] = []
        while len(items) < self.window:
            item = self.draw()
            if item is None:
                break
            items.append(item)
        if self.bucketing and items:
            self._encode(items)
            items.sort(key=lambda i: len((i.example or {})["input_ids"]))
        batches = [items[s : s + self.batch] for s in range(0, len(items), self.batch)]
        if self.bucketing:
            self.rng.shuffle(batches)
        self.queue.extend(batches)

    def _encode(self, items: list[Item]) -> None:
        """Tokenize rows with the task's own checks and encoding (errors name the file and line)."""
        todo = [i for i in items if i.example is None]
        if not todo:
            return
        table = Table(self.rows.path, [i.row for i in todo], [self.rows.label(i.position) for i in todo],
                      self.rows.columns)  # fmt: skip
        self.task.check(table)
        for item, example in zip(todo, self.task.encode(table, self.tokenizer)):
            item.example = example

    # ------------------------------------------------------------------ steps
    def steps(self) -> Iterator[tuple[list[dict[str, Any]], list[list[int]], list[list[int]], list[int]]]:
        """The optimizer steps of the rest of this pass; `pass_done` is set when it ends."""
        self.pass_done = False
        fresh, taken = self.index == 0 and not self.held, 0  # a pass from its start, or a resumed one
        while True:
            step = self.next_step()
            if step is None:
                if fresh and not taken:  # (else every epoch would end at once, forever)
                    share = f" for each of {self.dist.world} processes" if self.dist.active else ""
                    raise DataError(f"{self.rows.path}: no training rows{share}; check data.train")
                self.pass_done = True
                return
            taken += 1
            yield step

    def next_step(self) -> tuple[list[dict[str, Any]], list[list[int]], list[list[int]], list[int]] | None:
        """One optimizer step's micro-batches, or None (and a new pass begins) when the pass ends."""
        group: list[list[Item]] = []
        while len(group) < self.accumulation:
            if not self.queue:
                self._refill()
            if not self.queue:
                break
            group.append(self.queue.pop(0))
        for batch in group:
            self._encode(batch)
        mine = [[len((i.example or {})["input_ids"]) for i in batch] for batch in group]
        every = self._gather(mine)
        steps = min(len(lengths) for lengths in every)  # every process takes part in each micro-batch
        if steps == 0:
            self._restart()
            return None
        examples = [i.example or {} for batch in group[:steps] for i in batch]
        local: list[list[int]] = []
        counted: list[list[int]] = []
        lengths: list[int] = []
        at = 0
        for batch in group[:steps]:
            local.append(list(range(at, at + len(batch))))
            at += len(batch)
        for k in range(steps):
            counted.append(list(range(len(lengths), len(lengths) + sum(len(e[k]) for e in every))))
            lengths += [n for e in every for n in e[k]]
        return examples, local, counted, lengths

    def _gather(self, value: Any) -> list[Any]:
        """`value` from every process, in rank order (itself alone without torchrun)."""
        if not self.dist.active:
            return [value]
        out: list[Any] = [None] * self.dist.world
        torch_dist.all_gather_object(out, value)
        return out

    # ------------------------------------------------------------------ exact resume
    def state_dict(self) -> list[dict[str, Any]]:
        """Every process's position in the stream (call it on every process: it gathers)."""
        version, internal, gauss = self.rng.getstate()
        return self._gather({
            "file_bytes": self.rows.path.stat().st_size,
            "position": list(self.position),
            "index": self.index,
            "buffer": [list(i.position) for i in self.buffer],
            "queue": [[list(i.position) for i in batch] for batch in self.queue],
            "rng": [version, list(internal), gauss],
        })  # fmt: skip

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        """Continue from a saved position: re-read the buffered rows from theirs."""
        if len(states) != self.dist.world:
            raise ConfigError(f"the checkpoint's stream positions are those of {len(states)} process(es); resume "
                              f"a data.streaming run with the same number ({self.dist.world} now)")  # fmt: skip
        state = states[self.dist.rank]
        size = self.rows.path.stat().st_size
        if state.get("file_bytes", size) != size:
            raise DataError(f"{self.rows.path} changed since the checkpoint was saved ({state['file_bytes']} bytes "
                            f"then, {size} now); a stream resumes only on the file it was reading")  # fmt: skip
        self._restart()
        self.position, self.index = (state["position"][0], state["position"][1]), state["index"]
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        sizes = [len(b) for b in state["queue"]]
        places: list[Position] = [(p[0], p[1]) for p in state["buffer"]]
        places += [(p[0], p[1]) for batch in state["queue"] for p in batch]
        items = [Item(p, row) for p, row in zip(places, self.rows.rows_at(places))]
        self.buffer = items[: len(state["buffer"])]
        rest = items[len(state["buffer"]) :]
        for size in sizes:
            self.queue.append(rest[:size])
            rest = rest[size:]


def stream_splits(task: Any, tokenizer: Any) -> Splits:
    """The splits of a streaming run: validation and test read and tokenized as usual (they are
    small); the training rows come from a `StreamSource`."""
    d, seed = task.config.data, task.config.seed
    task.labels_from = "data.labels"
    validation = sample(task.read(d.validation), d.max_eval_samples, seed)
    test = sample(task.read(d.test), d.max_eval_samples, seed) if d.test else None
    return Splits(train=[], validation=task.encode(validation, tokenizer),
                  test=task.encode(test, tokenizer) if test is not None else None,
                  files={k: v for k, v in (("validation", d.validation), ("test", d.test)) if v})  # fmt: skip
