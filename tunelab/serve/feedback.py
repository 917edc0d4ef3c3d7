"""The deployment log behind `tunelab serve RUN --log DIR`, the feedback it takes, and
`tunelab feedback export`, which turns that feedback into training data.

With `--log DIR` (off by default) every answered request (classify, entities, predict, answer,
completions, chat) is stored with an id, which the response carries; `POST /v1/feedback`
attaches a rating (up, down, or a 1-5 score) and an optional correction to it. Everything lives in
one SQLite file, `DIR/feedback.sqlite`, in WAL mode: a write is committed before the server
answers, so a feedback call that got a 2xx survives the server being killed (`synchronous=NORMAL`
keeps WAL commits across a process crash; only a power loss can take the last ones).

SQLite from the standard library is the store because the log is one writer and a few readers on
one machine, with no service to run; the export is a few SELECTs and JSON lines.

Export (`feedback export DIR --format F --output FILE`), using each answer's latest feedback:
- `sft`: a corrected completion or chat answer becomes a row with the correction as the answer
  (`{"prompt", "completion"}` or `{"messages"}`); `--approved` adds the up-rated answers as given.
- `preference`: a corrected answer that was not up-rated (rated down, scored 1-3, or not rated)
  becomes `{"prompt", "chosen": correction, "rejected": answer}`; a chat with more than one user
  turn (or a system message) keeps its messages in `prompt`, with `chosen`/`rejected` as message lists.
- `classification`: a corrected label becomes `{"text", "label"}`; `--approved` adds the up-rated
  predictions.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError, TunelabError

FILE = "feedback.sqlite"
GENERATIVE = ("completion", "chat")
SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    model TEXT NOT NULL,
    task TEXT NOT NULL,
    kind TEXT NOT NULL,      -- classify, entities, predict, answer, completion, chat
    inputs TEXT NOT NULL,    -- JSON: the texts (or [question, context] pairs, or chat messages)
    outputs TEXT NOT NULL    -- JSON: one result per input (a text for completions and chat)
);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    answer_id TEXT NOT NULL REFERENCES answers(id),
    item INTEGER NOT NULL,   -- which input of the request (0 for chat)
    created REAL NOT NULL,
    rating TEXT,             -- up, down, or NULL with a score
    score INTEGER,           -- 1-5, or NULL
    correction TEXT
);
CREATE INDEX IF NOT EXISTS feedback_answer ON feedback(answer_id);
"""
FORMATS = ("sft", "preference", "classification")


def check_log_folder(folder: str | Path) -> None:
    """Refuse a `--log` folder that cannot be written, before anything loads."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--log {folder}: is a file; give a folder for the log")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--log {folder}: {existing} is not a writable folder; give a folder you can write to"
        )


class AnswerLog:
    """The SQLite log of one served model: `record` an answer, attach `feedback` to it."""

    def __init__(self, folder: str | Path, model: str, task: str) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError(f"--log {folder}: is a file; give a folder for the log")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.folder / FILE, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise ConfigError(
                f"--log {folder}: cannot write the log there ({e}); give a writable folder"
            ) from None
        self.model, self.task = model, task
        self.lock = threading.Lock()  # one connection, written by the event loop and the worker's callbacks

    def record(self, kind: str, inputs: list[Any], outputs: list[Any], ident: str | None = None) -> str:
        """Store an answer; returns its id (`ident`, or a new one)."""
        ident = ident or f"{kind}-{uuid.uuid4().hex[:24]}"
        with self.lock:
            self.db.execute(
                "INSERT INTO answers VALUES (?, ?, ?, ?, ?, ?, ?)",
                (ident, time.time(), self.model, self.task, kind, json.dumps(inputs), json.dumps(outputs)),
            )
        return ident

    def answer(self, ident: str) -> tuple[str, list[Any], list[Any]] | None:
        """(kind, inputs, outputs) of a stored answer, or None."""
        with self.lock:
            row = self.db.execute(
                "SELECT kind, inputs, outputs FROM answers WHERE id = ?", (ident,)
            ).fetchone()
        return None if row is None else (row[0], json.loads(row[1]), json.loads(row[2]))

    def feedback(self, ident: str, item: int, rating: str | None, score: int | None,
                 correction: str | None) -> int:  # fmt: skip
        """Attach feedback to answer `ident`'s input `item`; returns the feedback's id (committed)."""
        with self.lock:
            cursor = self.db.execute(
                "INSERT INTO feedback (answer_id, item, created, rating, score, correction) VALUES (?, ?, ?, ?, ?, ?)",
                (ident, item, time.time(), rating, score, correction),
            )
        return int(cursor.lastrowid or 0)

    def close(self) -> None:
        with self.lock:
            self.db.close()


def rated(rows: sqlite3.Cursor) -> Iterator[dict[str, Any]]:
    """Each (answer, item)'s latest feedback, joined with the answer."""
    for kind, inputs, outputs, item, rating, score, correction in rows:
        yield {"kind": kind, "inputs": json.loads(inputs), "outputs": json.loads(outputs), "item": item,
               "rating": rating, "score": score, "correction": correction}  # fmt: skip


def approved(f: dict[str, Any]) -> bool:
    return f["rating"] == "up" or (f["score"] is not None and f["score"] >= 4)


def training_rows(f: dict[str, Any], fmt: str, with_approved: bool) -> list[dict[str, Any]]:
    """The training rows one piece of feedback gives in format `fmt` (none, or one)."""
    kind, item, correction = f["kind"], f["item"], f["correction"]
    if fmt == "classification":
        if kind != "classify" or item >= len(f["inputs"]):
            return []
        if correction:
            return [{"text": f["inputs"][item], "label": correction}]
        return (
            [{"text": f["inputs"][item], "label": f["outputs"][item]["label"]}]
            if with_approved and approved(f)
            else []
        )
    if kind not in GENERATIVE:
        return []
    answer = f["outputs"][0] if kind == "chat" else f["outputs"][item]
    if fmt == "sft":
        text = correction or (answer if with_approved and approved(f) else None)
        if text is None:
            return []
        if kind == "chat":
            return [{"messages": [*f["inputs"], {"role": "assistant", "content": text}]}]
        return [{"prompt": f["inputs"][item], "completion": text}]
    if not correction or approved(f) or correction == answer:  # preference: the correction is chosen
        return []
    if kind == "completion":
        return [{"prompt": f["inputs"][item], "chosen": correction, "rejected": answer}]
    messages = f["inputs"]
    if len(messages) == 1:
        return [{"prompt": messages[0]["content"], "chosen": correction, "rejected": answer}]
    return [{"prompt": messages, "chosen": [{"role": "assistant", "content": correction}],
             "rejected": [{"role": "assistant", "content": answer}]}]  # fmt: skip


def export_feedback(folder: str | Path, fmt: str, output: str | Path, with_approved: bool = False) -> int:
    """Write the training rows of the log in `folder` to `output` (JSON lines); returns how many.

    Raises:
        TunelabError: no log in `folder`, an unknown format, or `output` already exists.
    """
    db_path, out = Path(folder) / FILE, Path(output)
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if not db_path.is_file():
        raise TunelabError(
            f"{folder}: no feedback log ({FILE}) here; start the server with tunelab serve RUN --log {folder}"
        )
    if out.exists():
        raise TunelabError(
            f"--output {out}: already exists; choose another name (tunelab does not overwrite it)"
        )
    if not out.parent.is_dir():
        raise TunelabError(f"--output {out}: the folder {out.parent} does not exist; create it first")
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        cursor = db.execute(
            "SELECT a.kind, a.inputs, a.outputs, f.item, f.rating, f.score, f.correction FROM feedback f "
            "JOIN answers a ON a.id = f.answer_id WHERE f.id IN "
            "(SELECT MAX(id) FROM feedback GROUP BY answer_id, item) ORDER BY f.id"
        )
        rows = [row for f in rated(cursor) for row in training_rows(f, fmt, with_approved)]
    finally:
        db.close()
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.rename(out)
    return len(rows)
