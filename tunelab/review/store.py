"""A review folder: `review.sqlite` holds the items (a prompt and the two models' answers) and
every rating, each under its reviewer's name, so a review can stop and resume, and several
reviewers can rate the same items. SQLite (standard library) in WAL mode: one small file, safe
under the page's concurrent requests, readable by any tool."""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

FILE = "review.sqlite"
CHOICES = ("a", "b", "tie", "skip")
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    prompt TEXT NOT NULL,
    answer_a TEXT NOT NULL,
    answer_b TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ratings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    item INTEGER NOT NULL REFERENCES items(id),
    reviewer TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'skip')),
    score INTEGER CHECK (score BETWEEN 1 AND 5),
    comment TEXT,
    created REAL NOT NULL,
    UNIQUE (item, reviewer)
);
"""


@dataclass(frozen=True)
class Item:
    id: int
    prompt: str
    answer_a: str
    answer_b: str


class Review:
    """One review folder's database."""

    def __init__(self, folder: str | Path, create: bool = False) -> None:
        self.folder = Path(folder)
        path = self.folder / FILE
        if not create and not path.is_file():
            raise TunelabError(
                f"{folder}: no review here ({FILE}); start one with tunelab review A B --prompts FILE"
            )
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        self.lock = threading.Lock()

    @classmethod
    def create(cls, folder: Path, a: str, b: str, items: list[tuple[str, str, str]]) -> Review:
        """A new review of `a` against `b` over (prompt, answer a, answer b) items, written under
        a temporary name and renamed, so a failed start leaves nothing behind."""
        tmp = folder.with_name(f".{folder.name}.partial")
        tmp.mkdir(parents=True)
        review = cls(tmp, create=True)
        with review.lock:
            review.db.executemany(
                "INSERT INTO meta VALUES (?, ?)", [("a", a), ("b", b), ("created", str(time.time()))]
            )
            review.db.executemany("INSERT INTO items (prompt, answer_a, answer_b) VALUES (?, ?, ?)", items)
        review.db.close()
        tmp.rename(folder)
        return cls(folder)

    def meta(self) -> dict[str, str]:
        with self.lock:
            return dict(self.db.execute("SELECT key, value FROM meta").fetchall())

    def items(self) -> list[Item]:
        with self.lock:
            return [Item(*row) for row in self.db.execute("SELECT * FROM items ORDER BY id")]

    def next_item(self, reviewer: str) -> Item | None:
        """The first item `reviewer` has not rated or skipped."""
        with self.lock:
            row = self.db.execute(
                "SELECT * FROM items WHERE id NOT IN (SELECT item FROM ratings WHERE reviewer = ?) ORDER BY id",
                (reviewer,),
            ).fetchone()
        return None if row is None else Item(*row)

    def progress(self, reviewer: str) -> tuple[int, int]:
        """(items this reviewer has done, items in all)."""
        with self.lock:
            done = self.db.execute("SELECT COUNT(*) FROM ratings WHERE reviewer = ?", (reviewer,)).fetchone()[
                0
            ]
            total = self.db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        return int(done), int(total)

    def rate(self, item: int, reviewer: str, choice: str, score: int | None, comment: str | None) -> None:
        """Store (or replace) `reviewer`'s rating of `item`."""
        with self.lock:
            self.db.execute(
                "INSERT OR REPLACE INTO ratings (item, reviewer, choice, score, comment, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (item, reviewer, choice, score, comment or None, time.time()),
            )

    def ratings(self) -> list[dict[str, Any]]:
        with self.lock:
            rows = self.db.execute(
                "SELECT item, reviewer, choice, score, comment FROM ratings ORDER BY id"
            ).fetchall()
        return [dict(zip(("item", "reviewer", "choice", "score", "comment"), row)) for row in rows]

    def close(self) -> None:
        self.db.close()
