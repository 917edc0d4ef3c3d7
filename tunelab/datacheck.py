"""`tunelab data check`: what training will make of the data, before any compute is spent.

It reads the data exactly as `train` does (the task's `load_splits` and `read`, with the
model's tokenizer and never its weights) and reports the format and column mapping, rows
per split, labels or lengths, the token-length histogram and the rows `data.max_length`
cuts, empty and duplicate rows, rows shared by train and validation/test, and for
instruction and chat data three rendered examples with the loss-carrying tokens marked
`[[...]]` and whether each example's answer ends with an end-of-turn (or eos) target: a
template without one trains a model that never stops. Every finding names the file and row.

Errors are data that training refuses (exit 2); warnings are legal but suspicious. `train`
prints the short form (`short_lines`) unless `data.check=false`.
"""

from __future__ import annotations

import copy
import json
import statistics
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from tunelab.chunks import iter_tables
from tunelab.config import Config, max_length
from tunelab.data import FORMATS, Table, is_missing, read_table
from tunelab.errors import TunelabError
from tunelab.generation import stop_token_ids
from tunelab.models import load_tokenizer, quiet_transformers, resolve_model
from tunelab.tasks import TASKS
from tunelab.tasks.generative import IGNORE

SHOWN = 5  # findings of one kind printed in full; JSON holds them all
EXAMPLES = 3  # rendered chat examples


@dataclass
class Finding:
    level: Literal["error", "warning"]
    kind: str  # column, empty, load, duplicate, leakage, cut, eos
    message: str  # starts with the file and row


@dataclass
class Row:
    """One data row as the check sees it."""

    where: str  # file:line, or file (row N)
    key: str  # the model's input: duplicates and leakage compare it
    labels: list[str]  # label names (token tasks: the tags); [] where the task has none
    length: int | None = None  # tokens before data.max_length cuts; None: rows are never cut
    example: dict[str, Any] | None = None  # causal-lm: untruncated input_ids and labels


@dataclass
class Report:
    task: str
    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)  # what the task reads -> the file's column
    unused: dict[str, list[str]] = field(default_factory=dict)  # file -> columns nothing reads
    files: dict[str, str] = field(default_factory=dict)  # split -> path
    rows: dict[str, int] = field(default_factory=dict)  # split -> rows in its file
    partial: list[str] = field(default_factory=list)  # splits of which only the first rows were checked
    examples: dict[str, int] = field(default_factory=dict)  # split -> examples as training sees them
    labels: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> label -> rows (tokens)
    lengths: dict[str, dict[str, float]] = field(default_factory=dict)  # split -> min/median/mean/p95/max
    histogram: list[tuple[int, int, int]] = field(default_factory=list)  # train: (from, to, rows)
    max_length: int = 0
    cut: dict[str, int] = field(default_factory=dict)  # split -> rows longer than max_length
    eos: dict[str, int] = field(default_factory=dict)  # {"checked": n, "missing": m} for chat / completion
    rendered: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    def add(self, level: Literal["error", "warning"], kind: str, message: str) -> None:
        self.findings.append(Finding(level, kind, message))

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    def exit_code(self, strict: bool = False) -> int:
        """2 with errors; with `strict`, 1 with warnings; else 0."""
        return 2 if self.errors else 1 if strict and self.findings else 0

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items() if k != "findings"}
        out["histogram"] = [{"from": a, "to": b, "rows": n} for a, b, n in self.histogram]
        out["findings"] = [vars(f) for f in self.findings]
        return out

    def summary(self) -> str:
        """One line: rows, cuts, leakage, end-of-turn targets."""
        parts = [", ".join(f"{n} {split}" for split, n in self.rows.items()) + " rows"]
        if self.cut:
            parts.append(f"{sum(self.cut.values())} cut by data.max_length={self.max_length}")
        leaks = sum(f.kind == "leakage" for f in self.findings)
        if len(self.files) > 1:
            parts.append(f"{leaks} shared with train" if leaks else "no train rows in validation/test")
        if self.eos.get("checked"):
            missing = self.eos["missing"]
            parts.append(f"end-of-turn target missing in {missing} of {self.eos['checked']}" if missing
                         else f"end-of-turn target in all {self.eos['checked']}")  # fmt: skip
        if self.partial:
            parts.append(f"only the first {', '.join(f'{self.rows[s]:,} {s}' for s in self.partial)} rows were "
                         f"checked (all of them: tunelab data check CONFIG)")  # fmt: skip
        return "data check: " + "; ".join(parts)

    def short_lines(self) -> list[str]:
        """The few lines `train` prints: the summary, then one line per kind of finding."""
        lines = [self.summary()]
        kinds: dict[str, list[Finding]] = {}
        for f in self.findings:
            kinds.setdefault(f.kind, []).append(f)
        for found in kinds.values():
            more = f" (and {len(found) - 1} more like it)" if len(found) > 1 else ""
            lines.append(f"  {found[0].level}: {found[0].message}{more}")
        if self.findings:
            lines.append("  the whole report: tunelab data check CONFIG")
        return lines

    def lines(self) -> list[str]:
        """The whole report as text."""
        out = [f"task {self.task}, format {self.format}"]
        out += [f"  {what:<22} <- column '{column}'" for what, column in self.columns.items()]
        out += [f"  not read from {path}: {', '.join(cols)}" for path, cols in self.unused.items()]
        for split, path in self.files.items():
            seen = f" ({self.examples[split]} examples)" if split in self.examples else ""
            out.append(f"{split:<11} {self.rows.get(split, 0):>7} rows{seen}  {path}")
        if "validation" in self.examples and "validation" not in self.files:
            out.append(f"validation {self.examples['validation']:>7} examples held out from train")
        for split, counts in self.labels.items():
            shown = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:12])
            out.append(f"labels ({split}): {shown}" + (" ..." if len(counts) > 12 else ""))
        for split, s in self.lengths.items():
            out.append(f"tokens ({split}): min {s['min']:.0f}, median {s['median']:.0f}, mean {s['mean']:.1f}, "
                       f"p95 {s['p95']:.0f}, max {s['max']:.0f}")  # fmt: skip
        if self.histogram:
            top = max(n for _, _, n in self.histogram) or 1
            out.append(
                f"token-length histogram (train; '>': rows there pass data.max_length={self.max_length})"
            )
            for a, b, n in self.histogram:
                mark = ">" if b > self.max_length else " "
                out.append(f"  {a:>6}-{b:<6}{mark} {'#' * round(30 * n / top):<30} {n}")
        if self.cut:
            out.append("cut by data.max_length: " + ", ".join(f"{s} {n}" for s, n in self.cut.items()))
        for text in self.rendered:
            out += ["", "example (loss on [[...]]):", text]
        if self.eos.get("checked"):
            out += ["", self.summary().split("; ")[-1]]
        errors, warnings = len(self.errors), len(self.findings) - len(self.errors)
        out += ["", f"{errors} error(s), {warnings} warning(s)"]
        kinds: dict[str, list[Finding]] = {}
        for f in self.findings:
            kinds.setdefault(f.kind, []).append(f)
        for found in kinds.values():
            out += [f"{f.level}: {f.message}" for f in found[:SHOWN]]
            if len(found) > SHOWN:
                out.append(f"  ... and {len(found) - SHOWN} more {found[0].kind} findings (--json lists all)")
        return out


def named_columns(config: Config) -> dict[str, str]:
    """Config key -> the column it names, for the tasks whose files have fixed columns."""
    d = config.data
    if config.task in ("classification", "regression"):
        keys = {"data.text_column": d.text_column}
        if d.text_pair_column:
            keys["data.text_pair_column"] = d.text_pair_column
        if d.label_columns:
            keys.update({f"data.label_columns[{i}]": c for i, c in enumerate(d.label_columns)})
        else:
            keys["data.label_column"] = d.label_column
        return keys
    if config.task == "token-classification":
        return {"data.tokens_column": d.tokens_column, "data.tags_column": d.tags_column}
    if config.task == "seq2seq":
        return {"data.source_column": d.source_column, "data.target_column": d.target_column}
    if config.task in ("causal-lm", "masked-lm") and d.format == "text":
        return {"data.text_column": d.text_column}
    return {}


LAYOUT_COLUMNS = {"messages": ["messages"], "sharegpt": ["conversations", "system"],
                  "alpaca": ["instruction", "input", "output", "system", "history"],
                  "prompt-completion": ["prompt", "completion"]}  # fmt: skip


def files_of(config: Config) -> dict[str, str]:
    d = config.data
    return {k: v for k, v in (("train", d.train), ("validation", d.validation), ("test", d.test)) if v}


def check_columns(config: Config, report: Report) -> None:
    """Every column the config names is in every file (before anything is tokenized); empty rows."""
    named = named_columns(config)
    for split, path in files_of(config).items():
        suffix = Path(path).suffix.lower()
        if suffix not in FORMATS or suffix == ".txt" or not Path(path).is_file():
            continue  # CoNLL and plain text have no columns; a missing file is load_splits' error
        try:
            table = read_table(path, config.data.format if config.data.format in FORMATS.values() else "auto")
        except TunelabError:
            continue  # load_splits reports it
        report.rows[split] = len(table)
        header = f"{path}:1" if FORMATS[suffix] in ("csv", "tsv") else table.where(0)
        for key, column in named.items():
            if column not in table.columns:
                near = [c for c in table.columns if c.lower() == column.lower()]
                hint = f" (did you mean '{near[0]}'?)" if near else ""
                report.add("error", "column", f"{header}: no column '{column}' ({key}){hint}; the file has: "
                                              f"{', '.join(table.columns)}; set {key}=<column name>")  # fmt: skip
        wanted = set(named.values()) | {c for cols in LAYOUT_COLUMNS.values() for c in cols}
        if named and set(table.columns) - wanted:
            report.unused[path] = [c for c in table.columns if c not in wanted]
        for i, row in enumerate(table.rows):
            if all(is_missing(v) or v == [] for v in row.values()):
                report.add("error", "empty", f"{table.where(i)}: the row is empty; remove it")
            else:
                for key, column in named.items():
                    if column in row and is_missing(row[column]) and "label" not in key:
                        report.add("error", "empty", f"{table.where(i)}: column '{column}' is empty; "
                                                     f"fill it in or remove the row")  # fmt: skip


def tokenizer_path(model: str) -> str:
    """Where the tokenizer of `model:` is: a tunelab run's own model folder, else the model's."""
    run = Path(model).expanduser()
    if (run / "config.yaml").is_file() and (run / "model").is_dir():
        return str(run / "model")
    return resolve_model(model)


def check_config(config: Config) -> Report:
    """The whole check of a config's data: columns, then `load_splits` as `train` runs it, then the rows."""
    config = copy.deepcopy(config)  # load_splits records what it detects in the config
    report = Report(task=config.task, files=files_of(config), max_length=max_length(config))
    check_columns(config, report)
    if report.errors:
        return report
    try:
        with quiet_transformers():
            tokenizer = load_tokenizer(tokenizer_path(config.model))
            task = TASKS[config.task](config)
            splits = task.load_splits(tokenizer)
    except TunelabError as e:
        report.add("error", "load", str(e))
        return report
    return check_data(config, tokenizer, task, splits, report)


def check_data(
    config: Config, tokenizer: Any, task: Any, splits: Any, report: Report | None = None,
    max_rows: int | None = None,
) -> Report:  # fmt: skip
    """Check the rows behind `splits` (from `task.load_splits(tokenizer)`): `train` calls this
    with what it has loaded, and `max_rows` (the check reads each file's first `max_rows` rows
    only, so a file of millions of rows never becomes Python rows here; the report says so);
    `check_config` for the whole command, every row."""
    report = report or Report(task=config.task, files=files_of(config), max_length=max_length(config))
    suffix = Path(config.data.train or "").suffix.lower()
    file_format = FORMATS.get(suffix, "conll" if suffix else "auto")  # token tasks read CoNLL files
    layout = getattr(task, "layout", None)  # causal-lm's record layout
    report.format = f"{layout} records in {file_format}" if layout and layout != file_format else file_format
    report.examples = {
        s: len(getattr(splits, s)) for s in ("train", "validation", "test") if getattr(splits, s)
    }
    view = VIEWS.get(config.task, generic_rows)
    tables: dict[str, list[Row]] = {}
    with quiet_transformers():
        for split, path in report.files.items():
            table, whole = first_rows(task, path, max_rows)
            report.rows[split] = len(table)
            if not whole:
                report.partial.append(split)
            tables[split] = view(task, table, tokenizer)
    report.columns = named_columns(config) or {
        f"record ({layout})": c for c in LAYOUT_COLUMNS.get(str(layout), [])
    }
    for split, rows in tables.items():
        count_labels(config, report, split, rows)
        count_lengths(report, split, rows, cuts=not (config.task == "causal-lm" and layout == "text"))
        duplicates(report, rows)
    train = {r.key: r for r in tables.get("train", [])}
    for split in ("validation", "test"):
        for row in tables.get(split, []):
            if row.key in train:
                report.add("warning", "leakage", f"{row.where}: the same input is in train at "
                                                 f"{train[row.key].where}; the {split} score overrates the model")  # fmt: skip
    if config.task == "causal-lm" and layout != "text":
        end_of_turn(report, tables.get("train", []), tokenizer)
    return report


def first_rows(task: Any, path: str, max_rows: int | None) -> tuple[Table, bool]:
    """The file's rows, checked as `task.read` checks them, and whether that is all of them: at
    most `max_rows`, read in chunks, for tasks that check a chunk at a time (`task.check`)."""
    if max_rows is None or not hasattr(task, "check"):
        return task.read(path), True
    chunks = cast(Generator[Table, None, None], iter_tables(path, task.config.data.format))
    rows: list[dict[str, Any]] = []
    lines: list[str] = []
    first = None
    whole = True
    try:
        for chunk in chunks:
            first = first or chunk
            rows += chunk.rows
            lines += chunk.lines
            if len(rows) >= max_rows:
                whole = next(chunks, None) is None and len(rows) == max_rows
                break
    finally:
        chunks.close()
    assert first is not None  # iter_tables raises for a file without rows
    table = Table(first.path, rows[:max_rows], lines[:max_rows], first.columns)
    task.check(table)
    return table, whole


def classification_rows(task: Any, table: Table, tokenizer: Any) -> list[Row]:
    d = task.config.data
    texts = [str(r[d.text_column]) for r in table.rows]
    pairs = [str(r[d.text_pair_column]) for r in table.rows] if d.text_pair_column else None
    ids = tokenizer(texts, pairs, truncation=False)["input_ids"]
    keys = [t if pairs is None else f"{t}\t{p}" for t, p in zip(texts, pairs or texts)]
    return [Row(table.where(i), keys[i], task.row_labels(table, i), len(ids[i])) for i in range(len(table))]


def token_rows(task: Any, table: Table, tokenizer: Any) -> list[Row]:
    words = [r["tokens"] for r in table.rows]
    ids = tokenizer(words, is_split_into_words=True, truncation=False)["input_ids"]
    return [
        Row(table.where(i), " ".join(words[i]), table.rows[i]["tags"], len(ids[i])) for i in range(len(table))
    ]


def seq2seq_rows(task: Any, table: Table, tokenizer: Any) -> list[Row]:
    d = task.config.data
    sources = [r[d.source_column] for r in table.rows]
    source_ids = tokenizer(sources, truncation=False)["input_ids"]
    target_ids = tokenizer(text_target=[r[d.target_column] for r in table.rows], truncation=False)[
        "input_ids"
    ]
    return [Row(table.where(i), sources[i], [], max(len(source_ids[i]), len(target_ids[i])))
            for i in range(len(table))]  # fmt: skip


def causal_rows(task: Any, table: Table, tokenizer: Any) -> list[Row]:
    """Plain text: one row per document; records: the example `encode` makes, uncut (a copy
    of the task with no length limit), keyed by the prompt."""
    if task.layout == "text":
        texts = [r["text"] for r in table.rows]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [Row(table.where(i), texts[i], [], len(ids[i])) for i in range(len(table))]
    uncut = copy.copy(task)
    uncut.config = copy.deepcopy(task.config)
    uncut.config.data.max_length = 1 << 30
    rows, stops, limit = [], set(stop_token_ids(tokenizer)), max_length(task.config)
    for i, record in enumerate(table.rows):
        key = json.dumps(record.get("messages", [])[:-1] or record.get("prompt"), sort_keys=True)
        try:
            example = uncut.encode(table.subset([i]), tokenizer)[0]
        except TunelabError:  # no target token at all: reported by end_of_turn
            example = {"input_ids": [], "labels": []}
        ids, labels = example["input_ids"], example["labels"]
        example["stop_cut"] = bool(last_answer_stops(labels, ids, stops)) and not last_answer_stops(
            labels[:limit], ids, stops
        )
        rows.append(Row(table.where(i), key, [], len(example["input_ids"]), example))
    return rows


def generic_rows(task: Any, table: Table, tokenizer: Any) -> list[Row]:
    """Tasks that cut no rows (windows, blocks): the whole row is the key."""
    return [
        Row(table.where(i), json.dumps(r, sort_keys=True, default=str), []) for i, r in enumerate(table.rows)
    ]


VIEWS = {"classification": classification_rows, "regression": classification_rows,
         "token-classification": token_rows, "seq2seq": seq2seq_rows, "causal-lm": causal_rows}  # fmt: skip


def count_labels(config: Config, report: Report, split: str, rows: list[Row]) -> None:
    if config.task not in ("classification", "token-classification"):
        return
    counts: dict[str, int] = {}
    for row in rows:
        for name in row.labels:
            counts[name] = counts.get(name, 0) + 1
    report.labels[split] = counts
    if split == "train" and config.task == "classification" and counts:
        rare = [name for name, n in counts.items() if n < 2]
        if rare:
            report.add("warning", "labels", f"{config.data.train}: label(s) {', '.join(rare)} have one row; "
                                            f"the model cannot learn a class from one example")  # fmt: skip


def count_lengths(report: Report, split: str, rows: list[Row], cuts: bool) -> None:
    lengths = sorted(r.length for r in rows if r.length is not None)
    if not lengths:
        return
    report.lengths[split] = {"min": lengths[0], "median": statistics.median(lengths),
                             "mean": statistics.fmean(lengths), "p95": lengths[int(0.95 * (len(lengths) - 1))],
                             "max": lengths[-1]}  # fmt: skip
    if split == "train":
        low, top = lengths[0], lengths[-1]
        width = max(1, -(-(top - low + 1) // 10))
        report.histogram = [(a, a + width - 1, sum(a <= n < a + width for n in lengths))
                            for a in range(low, top + 1, width)]  # fmt: skip
    if not cuts:
        return
    long = [r for r in rows if r.length is not None and r.length > report.max_length]
    if long:
        report.cut[split] = len(long)
    for row in long:
        lost = ""
        if row.example is not None and row.example.get("stop_cut"):
            lost = "; its end-of-turn target is cut off"
        report.add("warning", "cut", f"{row.where}: {row.length} tokens, cut to data.max_length="
                                     f"{report.max_length}{lost}")  # fmt: skip


def duplicates(report: Report, rows: list[Row]) -> None:
    first: dict[str, Row] = {}
    for row in rows:
        seen = first.setdefault(row.key, row)
        if seen is not row:
            other = (
                f" with other labels ({', '.join(seen.labels)} there)" if seen.labels != row.labels else ""
            )
            report.add("warning", "duplicate", f"{row.where}: the same input as {seen.where}{other}")


def last_answer_stops(labels: list[int], ids: list[int], stops: set[int]) -> bool | None:
    """Whether the last run of targets (the final answer) holds a stop token; None: no target at all."""
    end = max((i for i, label in enumerate(labels) if label != IGNORE), default=-1)
    if end < 0:
        return None
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return bool(stops & set(ids[start : end + 1]))


def end_of_turn(report: Report, rows: list[Row], tokenizer: Any) -> None:
    """Whether each example, as trained (cut at data.max_length), ends its last answer with an
    end-of-turn/eos target; the first few rendered with their targets marked."""
    stops = set(stop_token_ids(tokenizer))
    names = ", ".join(tokenizer.convert_ids_to_tokens(sorted(stops))) or "none: the tokenizer has no eos"
    limit, missing = report.max_length, 0
    for row in rows:
        assert row.example is not None  # causal_rows gives every record its example
        ids, labels = row.example["input_ids"], row.example["labels"]
        whole, trained = last_answer_stops(labels, ids, stops), last_answer_stops(labels[:limit], ids, stops)
        missing += not trained
        if whole is None:
            report.add("warning", "eos", f"{row.where}: the template puts no target token in this row")
        elif not whole:
            report.add("warning", "eos", f"{row.where}: the answer has no end-of-turn target ({names}), so the "
                                         f"model never learns to stop; use a template that closes each turn "
                                         f"with one (data.template=plain writes eos)")  # fmt: skip
        # (a stop token lost to data.max_length is reported with the cut)
        if len(report.rendered) < EXAMPLES:
            report.rendered.append(f"[{row.where}]\n" + marked(ids, labels, tokenizer))
    report.eos = {"checked": len(rows), "missing": missing}


def marked(ids: list[int], labels: list[int], tokenizer: Any) -> str:
    """The tokens as text, the loss-carrying ones inside [[ ]]."""
    out: list[str] = []
    group: list[int] = []
    target = False
    for token, label in [*zip(ids, labels), (None, None)]:
        if token is None or (label != IGNORE) != target:
            if group:
                text = tokenizer.decode(group, skip_special_tokens=False, clean_up_tokenization_spaces=False)
                out.append(f"[[{text}]]" if target else text)
            group, target = [], label is not None and label != IGNORE
        if token is not None:
            group.append(token)
    return "".join(out)


def main(config: Config, as_json: bool = False, strict: bool = False) -> int:
    """`tunelab data check`: print the report; the exit status (2: errors; 1: warnings with --strict)."""
    report = check_config(config)
    print(
        json.dumps(report.as_dict(), indent=2, ensure_ascii=False) if as_json else "\n".join(report.lines())
    )
    return report.exit_code(strict)
