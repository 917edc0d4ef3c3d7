"""Catalogue rows: the config and the command line (see harness.py for what each row is held to)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.catalogue.harness import Case, check
from tests.conftest import sentiment_rows

TRAIN = "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in sentiment_rows(24))
BASE = "model: {bert}\ntask: classification\ndata:\n  train: train.csv\n"

CASES = [
    Case("config-missing", ["train", "nope.yaml"], "nope.yaml"),
    Case(
        "config-unknown-key",
        ["train", "c.yaml"],
        "trian",
        files={"c.yaml": BASE + "trian:\n  epochs: 1\n", "train.csv": TRAIN},
    ),
    Case(
        "override-unknown-key",
        ["train", "c.yaml", "train.epoch=1"],
        "train.epoch",
        files={"c.yaml": BASE, "train.csv": TRAIN},
    ),
    Case(
        "override-bad-type",
        ["train", "c.yaml", "train.epochs=two"],
        "train.epochs",
        files={"c.yaml": BASE, "train.csv": TRAIN},
    ),
    Case("data-missing", ["train", "c.yaml"], "train.csv", files={"c.yaml": BASE}),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_catalogue(case: Case, tmp_path: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str],
                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    check(case, tmp_path / "user", models, capsys, monkeypatch)
