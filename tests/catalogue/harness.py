"""The catalogue of bad input: one row per case, each run through `tunelab.cli.main` in a
fresh user folder, and held to the same four promises:

- no traceback (nothing escapes `main`; stderr holds no "Traceback");
- one error line (`error: ...` or argparse's `tunelab: error: ...`) holding the case's phrase,
  which names the file, row, column or key and the fix;
- nothing of the user's removed or changed (every file present before is hashed before and after);
- nothing half-written left behind (on failure, no new file or folder appears, except the ones a
  row names in `may_create`).

Rows live beside this module, one file per area (test_train.py, test_data.py, ...); each file
parametrizes `check` over its rows. `{bert}`, `{llama}` in argv and file texts are replaced by the
tiny random models' paths; paths are relative to the user folder, which is the working directory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tunelab.cli import main


@dataclass
class Case:
    id: str
    argv: list[str]
    phrase: str  # what the error line must contain (case-insensitive)
    code: int = 2  # the expected exit status
    files: dict[str, str | bytes] = field(default_factory=dict)  # the user's files, written first
    setup: Callable[[Path], None] | None = None  # more set-up in the user folder (after `files`)
    may_create: tuple[str, ...] = ()  # paths (relative) a failing command may leave, e.g. a run it kept

    def __repr__(self) -> str:
        return self.id


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256 (or "dir") of everything under `folder`."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[str(Path(root, d).relative_to(folder))] = "dir"
        for f in files:
            p = Path(root, f)
            out[str(p.relative_to(folder))] = (
                "link" if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
            )
    return out


def fill(text: str, models: dict[str, Path]) -> str:
    for name, path in models.items():
        text = text.replace("{" + name + "}", str(path))
    return text


def check(case: Case, folder: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str],
          monkeypatch: pytest.MonkeyPatch) -> str:  # fmt: skip
    """Run one row in `folder` (the user's folder) and hold it to the promises; returns the error line."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in case.files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(fill(content, models))
    if case.setup is not None:
        case.setup(folder)
    monkeypatch.chdir(folder)
    before = snapshot(folder)
    capsys.readouterr()
    try:
        code = main([fill(a, models) for a in case.argv])
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out, f"{case.id}: traceback:\n{err[-2000:]}"
    assert code == case.code, f"{case.id}: exit {code}, expected {case.code}; stderr:\n{err[-2000:]}"
    errors = [line for line in err.splitlines() if line.startswith(("error:", "tunelab: error:"))]
    assert len(errors) == 1, f"{case.id}: expected one error line, got {errors!r}; stderr:\n{err[-2000:]}"
    assert case.phrase.lower() in errors[0].lower(), f"{case.id}: {errors[0]!r} lacks {case.phrase!r}"
    after = snapshot(folder)
    for path, digest in before.items():
        assert after.get(path) == digest, f"{case.id}: the user's {path} was removed or changed"
    left = sorted(
        p
        for p in set(after) - set(before)
        if not any(p == m or p.startswith(m + os.sep) for m in case.may_create)
    )
    assert not left, f"{case.id}: left behind after failing: {left}"
    return errors[0]
