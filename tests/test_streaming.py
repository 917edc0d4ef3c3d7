"""`data.streaming`: the training file read as training goes, through a seeded shuffle buffer.

Reader: every row read once per pass, from any saved position, never more rows held than the
buffer (+ the batches drawn), each process its own disjoint share. Source: a resume from a
saved state draws exactly the batches an uninterrupted one does. Training: CSV, JSONL and
Parquet of the same rows train identically; a run killed with SIGKILL mid-write of a
checkpoint resumes (`tunelab train --resume`) to the same metrics.jsonl and eval.json as an
uninterrupted run. Settings that need the whole file are refused at load, in one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from tunelab.checkpoint import CRASH_AT
from tunelab.cli import main
from tunelab.config import load_config
from tunelab.data import read_table
from tunelab.dist import Dist
from tunelab.errors import ConfigError, DataError
from tunelab.stream import StreamSource, open_rows
from tunelab.tasks import TASKS

from .conftest import sentiment_rows, write_csv, write_tiny_bert

LABELS = ["negative", "positive"]
VOLATILE = frozenset({"samples_per_s"})  # the one metrics.jsonl field that is a timing


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict], group: int = 7) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=group)  # several row groups
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("streaming")


@pytest.fixture(scope="module")
def bert(folder):
    return write_tiny_bert(folder / "bert")


def source(path: Path, bert: Path | None = None, rank: int = 0, world: int = 1, task: str = "classification",
           **settings) -> StreamSource:  # fmt: skip
    config = load_config(task=task, model=str(bert or "minilm-l6"), **{
        "data.train": str(path), "data.validation": str(path), "data.streaming": True,
        "data.labels": LABELS if task == "classification" else None, "train.max_steps": 10, "train.batch_size": 4,
        **settings})  # fmt: skip
    tokenizer = None
    if bert is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(bert)
    return StreamSource(config, TASKS[task](config), tokenizer, Dist(rank, world))


def drain(src: StreamSource) -> tuple[list[dict], int]:
    """Every row one pass draws, in order, and the most rows held at once."""
    rows, held = [], 0
    while (item := src.draw()) is not None:
        rows.append(item.row)
        held = max(held, src.held + 1)
    return rows, held


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_reader_rows_and_positions(folder, fmt):
    """The reader gives the rows tunelab.data reads (a quoted multi-line field and blank lines
    included), and re-reads any of them from its saved position."""
    rows = sentiment_rows(30, seed=4)
    rows[5]["text"] = 'a "quoted", two-line\nfilm'
    path = folder / f"rows.{fmt}"
    if fmt == "csv":
        write_csv(path, rows)
        path.write_text(path.read_text().replace("\n", "\n\n", 3))  # blank lines are skipped
    else:
        (write_jsonl if fmt == "jsonl" else write_parquet)(path, rows)
    reader = open_rows(str(path), "auto")
    found = list(reader.records(reader.start))
    assert [reader.parse(raw, where) for _, where, _, raw in found] == read_table(path).rows == rows
    picked = [found[i][0] for i in (29, 0, 5, 17)]
    assert reader.rows_at(picked) == [rows[i] for i in (29, 0, 5, 17)]
    middle = found[12][2]  # where row 13 begins
    assert [reader.parse(raw, where) for _, where, _, raw in reader.records(middle)] == rows[13:]


def test_buffer_bounds_memory(folder):
    """A pass holds at most shuffle_buffer rows at once, whatever the file's size; Python's
    allocations stay a small fraction of the file; every row comes once, shuffled, seeded."""
    rows = [{"text": f"the movie number {i} was good", "label": LABELS[i % 2]} for i in range(20000)]
    path = write_csv(folder / "big.csv", rows)
    expected = (len(rows), sum(hash(r["text"]) for r in rows))  # order-free: the drawn rows are not kept
    del rows
    src = source(path, **{"data.shuffle_buffer": 64})
    tracemalloc.start()
    count, digest, held, first = 0, 0, 0, []
    while (item := src.draw()) is not None:
        count, digest, held = count + 1, digest + hash(item.row["text"]), max(held, src.held + 1)
        if len(first) < 50:
            first.append(item.row["text"])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert held <= 64
    assert peak < path.stat().st_size / 10, f"{peak} bytes allocated for a {path.stat().st_size}-byte file"
    assert (count, digest) == expected
    assert first != [f"the movie number {i} was good" for i in range(50)]
    assert drain(source(path, **{"data.shuffle_buffer": 64}))[0][:50] == [
        {"text": t, "label": LABELS[int(t.split()[3]) % 2]} for t in first
    ]


def test_each_rank_reads_a_disjoint_share(folder):
    rows = sentiment_rows(50, seed=5)
    for i, row in enumerate(rows):
        row["text"] += f" {i}"
    path = write_jsonl(folder / "ranks.jsonl", rows)
    shares = [drain(source(path, rank=r, world=3))[0] for r in range(3)]
    texts = [{r["text"] for r in share} for share in shares]
    assert sum(len(t) for t in texts) == 50 and set().union(*texts) == {r["text"] for r in rows}
    assert sorted(len(t) for t in texts) == [16, 17, 17]


def test_processes_step_together(folder, bert):
    """Two processes (threads here, exchanging what torch.distributed would gather) take the
    same number of steps per pass, agree on the global micro-batches, and train disjoint rows;
    the pass ends for both when the first one's share runs out."""
    import threading

    rows = sentiment_rows(37, seed=7)
    for i, row in enumerate(rows):
        row["text"] += f" {i}"
    path = write_jsonl(folder / "two.jsonl", rows)
    barrier, slots = threading.Barrier(2), [None, None]

    def gather(rank: int, value):
        slots[rank] = value
        barrier.wait()
        out = list(slots)
        barrier.wait()
        return out

    seen: list[list] = [[], []]

    def run(rank: int) -> None:
        src = source(path, bert, rank=rank, world=2, **{"data.shuffle_buffer": 5, "train.batch_size": 3,
                                                        "train.gradient_accumulation": 2})  # fmt: skip
        src._gather = lambda value: gather(rank, value)  # type: ignore[method-assign]
        seen[rank] = list(src.steps())

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    a, b = seen
    assert len(a) == len(b) == 3  # 19 and 18 rows, micro-batches of 3, 2 per step
    assert [(s[2], s[3]) for s in a] == [(s[2], s[3]) for s in b]  # the same global view
    ids = [[tuple(e["input_ids"]) for s in steps for e in s[0]] for steps in seen]
    # rank 1's whole share; rank 0's but at most one batch (which sits out this pass)
    assert not set(ids[0]) & set(ids[1]) and len(ids[1]) == 18 and 19 - 3 <= len(ids[0]) <= 19


@pytest.mark.parametrize(
    ("fmt", "bucketing", "task"),
    [("csv", True, "classification"), ("parquet", False, "classification"), ("jsonl", True, "regression")],
)
def test_resume_draws_the_same_batches(folder, bert, fmt, bucketing, task):
    """A source restored from a saved state (through JSON, as state.json holds it) yields the
    same steps as the one that kept going, across the end of a pass."""
    rows: list[dict] = sentiment_rows(45, seed=6)
    if task == "regression":
        rows = [{"text": r["text"], "label": i % 7 / 2} for i, r in enumerate(rows)]
    path = folder / f"resume-{task}.{fmt}"
    {"csv": write_csv, "parquet": write_parquet, "jsonl": write_jsonl}[fmt](path, rows)
    settings = {
        "data.shuffle_buffer": 8,
        "train.length_bucketing": bucketing,
        "train.gradient_accumulation": 2,
    }
    first = source(path, bert, task=task, **settings)
    for _ in range(3):
        assert first.next_step() is not None
    saved = json.loads(json.dumps(first.state_dict()))
    assert saved[0]["buffer"] or saved[0]["queue"]  # something held, so the rebuild is tested
    second = source(path, bert, task=task, **settings)
    second.load_state_dict(saved)
    for _ in range(12):  # 45 rows, 8 per step: the pass ends after step 6, then a second pass
        assert second.next_step() == first.next_step()


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.max_steps=null", "train.max_steps"),
        ("data.validation=null", "data.validation"),
        ("data.labels=null", "data.labels"),
        ("task=token-classification", "task=classification and task=regression"),
        ("data.max_train_samples=10", "data.max_train_samples"),
        ("data.shots_per_class=2", "data.shots_per_class"),
        ("data.augment.method=eda", "data.augment.method"),
        ("data.train=rows.json", "JSONL"),
    ],
)
def test_refusals(override, named):
    base = ["data.streaming=true", "data.train=rows.csv", "data.validation=v.csv", "data.labels=[a,b]",
            "train.max_steps=5"]  # fmt: skip
    with pytest.raises(ConfigError) as error:
        load_config(overrides=[*base, override])
    assert named in str(error.value) and "\n" not in str(error.value)


def test_a_bad_row_is_named_by_its_line(folder, bert):
    rows = sentiment_rows(30, seed=8)
    rows[20]["label"] = "neutral"
    path = write_csv(folder / "bad-label.csv", rows)
    with pytest.raises(DataError, match=rf"{path}:22: label 'neutral' is not in data.labels"):
        list(source(path, bert).steps())


def test_a_file_without_rows_is_refused(folder):
    """A pass that yields nothing from its start is an error, not an endless run of empty epochs."""
    path = folder / "header-only.csv"
    path.write_text("text,label\n\n")
    with pytest.raises(DataError, match="no training rows"):
        list(source(path).steps())


# ---------------------------------------------------------------------------------- training


def train_args(bert: Path, train: Path, validation: Path, out: Path) -> list[str]:
    return [f"model={bert}", "method=full", f"data.train={train}", f"data.validation={validation}",
            "data.streaming=true", "data.shuffle_buffer=8", f"data.labels=[{','.join(LABELS)}]",
            "train.max_steps=14", "train.batch_size=4", "train.length_bucketing=false",
            "train.checkpoint_steps=3", "train.eval_steps=5", "train.log_steps=1", "train.precision=fp32",
            "train.num_threads=1", "train.learning_rate=3e-3", "train.progress_bar=false", f"output_dir={out}"]  # fmt: skip


def comparable(run: Path, leave_out: frozenset[str] = VOLATILE) -> tuple[dict, list[dict]]:
    scores = json.loads((run / "eval.json").read_text())
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return scores["validation"], [{k: v for k, v in e.items() if k not in leave_out} for e in lines]


@pytest.fixture(scope="module")
def data(folder):
    rows = sentiment_rows(40, seed=1)
    return {
        "csv": write_csv(folder / "train.csv", rows),
        "jsonl": write_jsonl(folder / "train.jsonl", rows),
        "parquet": write_parquet(folder / "train.parquet", rows),
        "validation": write_csv(folder / "validation.csv", sentiment_rows(16, seed=2)),
    }


@pytest.fixture(scope="module")
def reference(folder, bert, data):
    """An uninterrupted streaming run on the CSV file (in this process)."""
    import tunelab

    out = folder / "reference"
    tunelab.train(overrides=train_args(bert, data["csv"], data["validation"], out))
    return out


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_formats_train_alike(folder, bert, data, reference, fmt):
    """The same rows as JSONL or Parquet train exactly as the CSV did (two passes, an
    evaluation at the end of the first); only `epoch`, read from the file's bytes or rows, differs."""
    import tunelab

    out = folder / f"run-{fmt}"
    tunelab.train(overrides=train_args(bert, data[fmt], data["validation"], out))
    assert comparable(out, VOLATILE | {"epoch"}) == comparable(reference, VOLATILE | {"epoch"})
    lines = comparable(out)[1]
    assert [e["step"] for e in lines if e.get("split") == "validation"] == [5, 10, 14]  # 10 steps a pass
    assert json.loads((out / "eval.json").read_text())["train"]["epochs"] == pytest.approx(1.4, abs=0.15)


def test_sigkill_then_resume_matches(folder, bert, data, reference):
    """SIGKILL while the 4th checkpoint (step 10, the end of the first pass) is half written:
    `tunelab train --resume` continues from step 9's (mid-pass: rows in the buffer) to the
    metrics and scores of the uninterrupted run."""
    out = folder / "killed"
    env = {**os.environ, CRASH_AT: "checkpoint-write:4"}
    args = [sys.executable, "-m", "tunelab", "train", *train_args(bert, data["csv"], data["validation"], out)]
    killed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    checkpoints = sorted(p.name for p in (folder / ".killed.partial" / "checkpoints").glob("step-*"))
    assert checkpoints[-1] == "step-000009"
    state = json.loads(
        (folder / ".killed.partial" / "checkpoints" / "step-000009" / "state.json").read_text()
    )
    assert state["stream"][0]["buffer"]
    assert main(["train", "--resume", str(out)]) == 0  # `tunelab train --resume RUN`, in this process
    assert comparable(out) == comparable(reference)
