"""`tunelab data check`: each kind of finding names the file and row; a clean file passes;
`train` prints the short form unless data.check=false."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from tunelab.cli import main
from tunelab.config import load_config
from tunelab.datacheck import check_config

from .conftest import FILLER, NEGATIVE, POSITIVE, write_csv, write_tiny_llama

NO_END_OF_TURN = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def unique_rows(n: int, offset: int = 0) -> list[dict[str, str]]:
    """Reviews with distinct texts (no duplicates, no overlap between calls with other offsets)."""
    combos = list(itertools.permutations(FILLER, 3))[offset : offset + n]
    return [
        {"text": " ".join([*words, (POSITIVE if i % 2 == 0 else NEGATIVE)[i % 8]]),
         "label": "positive" if i % 2 == 0 else "negative"}
        for i, words in enumerate(combos)
    ]  # fmt: skip


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["data", "check", *args])
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture
def clean(tmp_path) -> dict[str, Path]:
    return {
        "train": write_csv(tmp_path / "train.csv", unique_rows(40)),
        "test": write_csv(tmp_path / "test.csv", unique_rows(10, offset=100)),
    }


def classify(tiny_bert, files, *extra: str) -> list[str]:
    return [f"model={tiny_bert}", f"data.train={files['train']}", f"data.test={files['test']}", *extra]


def test_a_clean_file_passes(tiny_bert, clean, capsys):
    code, out = run_cli(capsys, *classify(tiny_bert, clean))
    assert code == 0, out
    assert "0 error(s), 0 warning(s)" in out
    assert "labels (train): positive 20, negative 20" in out
    assert "data.text_column" in out and "column 'text'" in out


def test_unknown_column_is_an_error_naming_it_and_the_columns_there(tiny_bert, clean, capsys):
    code, out = run_cli(capsys, *classify(tiny_bert, clean, "data.text_column=review"))
    assert code == 2
    assert f"{clean['train']}:1: no column 'review' (data.text_column)" in out
    assert "the file has: text, label" in out


def test_train_test_overlap_names_both_rows(tiny_bert, clean, tmp_path):
    train = unique_rows(40)
    test = unique_rows(5, offset=100) + [train[6]]
    write_csv(tmp_path / "test.csv", test)
    report = check_config(load_config(overrides=classify(tiny_bert, clean)))
    leaks = [f.message for f in report.findings if f.kind == "leakage"]
    assert leaks == [f"{tmp_path / 'test.csv'}:7: the same input is in train at {clean['train']}:8; "
                     f"the test score overrates the model"]  # fmt: skip
    assert report.exit_code() == 0 and report.exit_code(strict=True) == 1


def test_rows_cut_by_max_length(tiny_bert, clean):
    rows = unique_rows(40)
    rows[2]["text"] = " ".join(["good film"] * 40)  # 80 words, one token each
    write_csv(clean["train"], rows)
    report = check_config(load_config(overrides=classify(tiny_bert, clean, "data.max_length=32")))
    cuts = [f.message for f in report.findings if f.kind == "cut"]
    assert cuts == [f"{clean['train']}:4: 82 tokens, cut to data.max_length=32"]  # 80 words + [CLS] [SEP]
    assert report.cut == {"train": 1}
    assert sum(n for _, _, n in report.histogram) == 40


def test_duplicates_and_empty_rows(tiny_bert, clean):
    rows = unique_rows(40)
    rows[9] = dict(rows[3], label="positive")
    rows[12] = {"text": "", "label": ""}
    write_csv(clean["train"], rows)
    report = check_config(load_config(overrides=classify(tiny_bert, clean)))
    assert [f.message for f in report.errors] == [f"{clean['train']}:14: the row is empty; remove it"]
    write_csv(clean["train"], [r for r in rows if r["text"]])
    report = check_config(load_config(overrides=classify(tiny_bert, clean)))
    assert [f.message for f in report.findings] == [
        f"{clean['train']}:11: the same input as {clean['train']}:5 with other labels (negative there)"
    ]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("llama"))


def write_chat(path: Path) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": f"is the film {word}"},
                      {"role": "assistant", "content": f"the film was {word}"}]}
        for word in POSITIVE + NEGATIVE
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_chat_template_without_an_end_of_turn_target(tiny_llama, tmp_path, capsys):
    chat = write_chat(tmp_path / "chat.jsonl")
    (tmp_path / "no_eot.jinja").write_text(NO_END_OF_TURN)
    args = ["task=causal-lm", f"model={tiny_llama}", f"data.train={chat}"]
    code, out = run_cli(capsys, *args, f"data.template={tmp_path / 'no_eot.jinja'}")
    assert code == 0  # legal, but a warning per row; --strict makes it fail
    assert f"{chat}:1: the answer has no end-of-turn target ([SEP]), so the model never learns to stop" in out
    assert "end-of-turn target missing in 16 of 16" in out
    assert "[[the film was good]]" in out  # the loss-carrying tokens, marked; no [SEP] among them
    assert run_cli(capsys, *args, f"data.template={tmp_path / 'no_eot.jinja'}", "--strict")[0] == 1

    code, out = run_cli(capsys, *args, "data.template=plain", "--json")
    report = json.loads(out)
    assert code == 0 and report["eos"] == {"checked": 16, "missing": 0}
    assert not [f for f in report["findings"] if f["kind"] == "eos"]
    assert len(report["rendered"]) == 3 and "[[the film was good [SEP]" in report["rendered"][0]
    assert report["format"].startswith("messages")


def test_train_prints_the_short_form_unless_data_check_is_off(
    tiny_bert, clean, tmp_path, capsys, monkeypatch
):
    import tunelab.run

    rows = unique_rows(40)
    write_csv(clean["test"], unique_rows(5, offset=100) + [rows[6]])
    args = [*classify(tiny_bert, clean), "method=full", "train.max_steps=1", "train.progress_bar=false",
            "train.precision=fp32"]  # fmt: skip
    assert main(["train", *args, f"output_dir={tmp_path / 'on'}"]) == 0
    out = capsys.readouterr().err
    assert "data check: 40 train, 6 test rows; 1 shared with train" in out
    assert f"warning: {clean['test']}:7: the same input is in train at {clean['train']}:8" in out

    monkeypatch.setattr(
        tunelab.run, "check_data", lambda *a, **k: pytest.fail("data.check=false still checks")
    )
    assert main(["train", *args, "data.check=false", f"output_dir={tmp_path / 'off'}"]) == 0
    assert "data check" not in capsys.readouterr().err


def test_train_checks_the_first_rows_of_a_large_file_and_says_so(
    tiny_bert, clean, tmp_path, capsys, monkeypatch
):
    """`train` reads at most CHECK_ROWS rows per file for its check, so a file of millions of rows
    is not read into Python rows here (training reads it in chunks); the line says so."""
    import tunelab.run

    monkeypatch.setattr(tunelab.run, "CHECK_ROWS", 25)
    args = [*classify(tiny_bert, clean), "method=full", "train.max_steps=1", "train.progress_bar=false",
            "train.precision=fp32", f"output_dir={tmp_path / 'run'}"]  # fmt: skip
    assert main(["train", *args]) == 0
    out = capsys.readouterr().err
    assert ("data check: 25 train, 10 test rows; no train rows in validation/test; only the first 25 train rows "
            "were checked (all of them: tunelab data check CONFIG)") in out  # fmt: skip
