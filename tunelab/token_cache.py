"""The tokenized-splits cache: encoded rows stored as Arrow files (Hugging Face `datasets`' own
cache format), memory-mapped back, under `<tunelab cache>/tokens/<key>/`.

The key is a hash of the data files' contents, the tokenizer's files and the encoding
settings (`cache_key`), so a second run, a `compare` or a resume of the same data reads the
tokens instead of tokenizing again. An entry is built in a temporary folder beside it and
renamed into place once complete (`meta.json` written last), so a crash never leaves a
half-written entry that a later run would read. `EncodedRows` is what the loop sees: a sequence
of example dicts read by index from the memory-mapped table, plus the `length` column that
length bucketing reads without materialising the rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from tunelab.device import cache_dir

if TYPE_CHECKING:
    import datasets

# `datasets` is imported where an entry is read or built, not at the top: it costs about a second
# and 90 MB, which commands that never touch the cache (predict, serve, export) should not pay.

CACHE_VERSION = 1  # bump when the stored layout or the encoding of a task changes
LENGTH = "length"  # the column holding each row's token count
META = "meta.json"  # written last in an entry: its presence marks the entry complete
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model", "chat_template.jinja")  # fmt: skip


class EncodedRows(Sequence[dict[str, Any]]):
    """Encoded examples of one split, read by index from a memory-mapped Arrow table: each row
    comes back as the same dict of token lists (+ "labels") that encoding made."""

    def __init__(self, dataset: datasets.Dataset):
        self.dataset = dataset
        self.columns = [c for c in dataset.column_names if c != LENGTH]

    def __len__(self) -> int:
        return self.dataset.num_rows

    @overload
    def __getitem__(self, i: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, i: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, i: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step == 1:
                return self._slice(start, max(stop - start, 0))
            return [self[j] for j in range(start, stop, step)]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} of {n}")
        return self._slice(i % n, 1)[0]

    def _slice(self, start: int, count: int) -> list[dict[str, Any]]:
        # datasets' fast_slice finds the record batch by binary search: no copy of the table
        return self.dataset.data.fast_slice(start, count).select(self.columns).to_pylist()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for start in range(0, len(self), 1024):
            yield from self._slice(start, min(1024, len(self) - start))

    def lengths(self) -> list[int]:
        """Every row's token count, from the `length` column (no row is read)."""
        return self.dataset.data.column(LENGTH).to_pylist()


def row_lengths(rows: Sequence[dict[str, Any]]) -> list[int]:
    """Token counts of encoded rows: the Arrow column where the rows are cached, else counted."""
    if isinstance(rows, EncodedRows):
        return rows.lengths()
    return [len(e["input_ids"]) for e in rows]


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str | None:
    """A hash of the tokenizer: its files where it was loaded from a folder, else its serialised
    state (the fast tokenizer's JSON, or the vocabulary), with its class and settings; None for
    an object that has neither (nothing to key a cache entry by)."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    files = (
        [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()] if folder.is_dir() else []
    )
    if files:
        for path in files:
            digest.update(path.name.encode() + file_digest(path).encode())
    else:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None and not hasattr(tokenizer, "get_vocab"):
            return None
        state = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
        digest.update(state.encode())
    settings = {
        k: getattr(tokenizer, k, None) for k in ("model_max_length", "padding_side", "truncation_side")
    }
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    """The entry name for these inputs (file hashes, tokenizer hash, settings)."""
    text = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def tokens_root() -> Path:
    return cache_dir() / "tokens"


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """No `datasets` progress bars or info lines while tunelab builds or reads an entry."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    level = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if was_enabled:
            datasets.enable_progress_bars()


def load_entry(key: str) -> tuple[Path, dict[str, EncodedRows], dict[str, Any]] | None:
    """(folder, splits, meta) of a complete entry, or None (never built, or cut short: no meta.json)."""
    import datasets

    folder = tokens_root() / key
    meta_path = folder / META
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        with quiet_datasets():
            splits = {
                name: EncodedRows(datasets.concatenate_datasets(
                    [datasets.Dataset.from_file(str(folder / f)) for f in files]))
                for name, files in meta["splits"].items()
            }  # fmt: skip
    except (OSError, ValueError, KeyError):  # a damaged entry is rebuilt, not trusted
        return None
    return folder, splits, meta


def build_entry(key: str, build: Callable[[Path], dict[str, Any]]) -> Path:
    """Build an entry: `build(tmp)` writes the split files into the temporary folder `tmp` and
    returns the meta ({"splits": {name: [file names]}, ...}); meta.json is written last and the
    folder renamed into place. An incomplete entry with the same key (no meta.json) is replaced;
    a concurrent builder (another torchrun process) that finished first wins.
    """
    root = tokens_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    tmp = root / f".{key}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with quiet_datasets():
            meta = build(tmp)
        (tmp / META).write_text(json.dumps({"version": CACHE_VERSION, **meta}, indent=1, sort_keys=True))
        if final.exists() and not (final / META).is_file():
            shutil.rmtree(final, ignore_errors=True)  # cut short before it was complete
        try:
            tmp.rename(final)
        except OSError:
            if not (final / META).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
