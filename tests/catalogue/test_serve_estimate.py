"""Catalogue rows: `tunelab serve` and `tunelab estimate` (see harness.py for what each row is held to).

`serve` must refuse before it binds a port or loads a model (the rows pass `--port 0`, so that a
server running on this machine cannot change what they see); `estimate` before it starts a probe.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.catalogue.harness import Case, check
from tests.conftest import sentiment_rows

TRAIN = "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in sentiment_rows(24))
BASE = "model: {bert}\ntask: classification\ndata:\n  train: train.csv\n"


CASES = [
    Case(
        "serve-port-not-a-number",
        ["serve", "no-such-run", "--port", "abc"],
        "argument --port: invalid int value",
    ),
    Case("serve-limit-not-a-number", ["serve", "no-such-run", "--max-batch", "many"], "argument --max-batch"),
    Case(
        "feedback-export-no-log",
        ["feedback", "export", "logs", "--format", "sft", "--output", "out.jsonl"],
        "no feedback log",
        files={"logs/notes.txt": "mine\n"},
    ),  # fmt: skip
    Case(
        "feedback-export-bad-format",
        ["feedback", "export", "logs", "--format", "dpo", "--output", "o.jsonl"],
        "argument --format: invalid choice",
    ),  # fmt: skip
    Case("review-no-review", ["review", "--report", "notes"], "no review here", files={"notes/a.txt": "x\n"}),
    Case(
        "review-prompts-missing",
        ["review", "runs/a", "--baseline", "--prompts", "nope.txt", "--no-page"],
        "nope.txt",
    ),  # fmt: skip
    Case(
        "serve-missing-run", ["serve", "no-such-run", "--port", "0"], "no-such-run is neither a tunelab run"
    ),
    Case(
        "serve-not-a-run",
        ["serve", "notes", "--port", "0"],
        "notes is neither a tunelab run (config.yaml)",
        files={"notes/todo.txt": "buy milk\n"},
    ),
    Case(
        "serve-port-out-of-range",
        ["serve", "no-such-run", "--port", "70000"],
        "--port must be between 0 and 65535",
    ),
    Case(
        "serve-host-unknown",
        ["serve", "no-such-run", "--host", "no-such-host.invalid"],
        "--host no-such-host.invalid: not an address of this machine",
    ),
    Case(
        "serve-zero-limit",
        ["serve", "no-such-run", "--port", "0", "--max-tokens", "0"],
        "--max-tokens must be >= 1 (got 0)",
    ),
    Case(
        "serve-zero-body-limit",
        ["serve", "no-such-run", "--port", "0", "--max-body-kb", "0"],
        "--max-body-kb must be >= 1",
    ),
    Case(
        "serve-log-is-a-file",
        ["serve", "no-such-run", "--port", "0", "--log", "notes.txt"],
        "--log notes.txt: is a file",
        files={"notes.txt": "my notes\n"},
    ),
    Case(
        "serve-unfinished-run",
        ["serve", "run", "--port", "0"],
        "run is not a finished tunelab run: it needs config.yaml and model/",
        files={"run/config.yaml": BASE, "train.csv": TRAIN},
    ),
    Case("estimate-config-missing", ["estimate", "nope.yaml"], "nope.yaml"),
    Case(
        "estimate-unknown-method",
        ["estimate", "c.yaml", "--methods", "lora,bogus"],
        "--methods: unknown bogus; choose from",
        files={"c.yaml": BASE, "train.csv": TRAIN},
    ),
    Case(
        "estimate-method-none",
        ["estimate", "c.yaml", "--methods", "none"],
        "'none' trains nothing",
        files={"c.yaml": BASE, "train.csv": TRAIN},
    ),
    Case(
        "estimate-zero-steps",
        ["estimate", "c.yaml", "--steps", "0"],
        "--steps must be an integer >= 1",
        files={"c.yaml": BASE, "train.csv": TRAIN},
    ),
    Case(
        "estimate-unknown-key",
        ["estimate", "c.yaml", "train.epoch=1"],
        "train.epoch",
        files={"c.yaml": BASE, "train.csv": TRAIN},
    ),
    Case(
        "estimate-config-method-unknown",
        ["estimate", "c.yaml", "method=bogus"],
        "method",
        files={"c.yaml": BASE, "train.csv": TRAIN},
    ),
    Case("estimate-data-missing", ["estimate", "c.yaml"], "train.csv", files={"c.yaml": BASE}),
    Case(
        "estimate-text-column-missing",
        ["estimate", "c.yaml", "data.text_column=sentence"],
        "sentence",
        files={"c.yaml": BASE, "train.csv": TRAIN},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_catalogue(case: Case, tmp_path: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str],
                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    check(case, tmp_path / "user", models, capsys, monkeypatch)


def test_serve_refuses_a_port_in_use_before_loading(tmp_path: Path, models: dict[str, Path],
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    try:
        port = str(held.getsockname()[1])
        case = Case("serve-port-in-use", ["serve", "no-such-run", "--port", port],
                    f"--port {port}: cannot listen on 127.0.0.1:{port}")  # fmt: skip
        check(case, tmp_path / "user", models, capsys, monkeypatch)
    finally:
        held.close()
