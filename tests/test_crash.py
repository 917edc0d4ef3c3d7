"""Crash at any moment: `tunelab train` is killed with SIGKILL at 20 moments (chosen by a seeded
RNG, spread over start-up, training, checkpoint writes, the final save and the final rename),
and `tunelab export` at a few more. After every kill the run either resumes to exactly the
metrics of an uninterrupted run, or is refused with one line that says how to go on, and
following that line works. Nothing half-written ever sits where a finished run or export is
expected.

To keep this to about a minute of CPU, kills are chained: the command that resumes after one
kill is the process the next kill stops, so every process started is both the check of the
previous kill and the victim of the next; each chain ends with a resume to completion, whose
result proves every kill in the chain resumable. Moments between two writes are hit exactly
with the test hook TUNELAB_TEST_CRASH_AT (tunelab.checkpoint.crash_point: the process sends
itself SIGKILL at a named point); the others are a random time after start or a random
training step, seen in metrics.jsonl.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tunelab.checkpoint import CRASH_AT
from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.run import metrics_log, partial_dir, recover_finished

from .conftest import sentiment_rows, write_csv, write_tiny_bert

SEED = 29
KILLS = 20  # train kills; the export gets EXPORT_KILLS more
STEPS_PER_EPOCH, EPOCHS = 12, 4  # 48 rows, batches of 4
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS
CHAINS = 2  # run side by side, one thread each
# points between two writes (tunelab.checkpoint.crash_point), each with the n-th time it is reached
AIMED = [
    ("checkpoint-write", (1, 2, 3)),  # half a checkpoint's files written in .tmp-step-N
    ("checkpoint-rename", (1, 2, 3)),  # all written, not yet renamed to step-N
    ("checkpoint-prune", (3, 4)),  # renamed, the oldest beyond keep_checkpoints not yet removed
    ("discard", (1,)),  # the oldest renamed aside, not yet deleted
    ("metrics-rewrite", (1,)),  # metrics.jsonl's kept lines written aside, not yet renamed over it
]
# the final save: weights saved; eval.json written (the run is complete); checkpoints removed
FINAL = ["final-save", "final-checkpoints", "final-rename"]
VOLATILE = {"samples_per_s"}  # the one metrics.jsonl field that is a timing


@dataclass
class Kill:
    kind: str  # "point" (the hook), "time" (seconds after start), "step" (a training step reached)
    point: str = ""
    at: float = 0.0  # seconds, or the step
    jitter: float = 0.0  # seconds between seeing the step and the kill
    order: float = 0.0  # where in a run it falls, to order a chain

    def __str__(self) -> str:
        return self.point if self.kind == "point" else f"{self.kind}={self.at:.2f}"


def moments(rng: random.Random) -> list[list[Kill]]:
    """KILLS moments dealt into CHAINS chains, each in run order. A kill once eval.json is
    written ends a chain: after it, a resume only moves the finished run into place."""
    aimed = [Kill("point", f"{name}:{rng.choice(nth)}", order=0.5) for name, nth in AIMED]
    aimed[-1].order = 0.55  # metrics.jsonl is rewritten as a process starts: a resumed one, mid-run
    finals = [Kill("point", f"{name}:1", order=1.5 if name == "final-save" else 2.0) for name in FINAL]
    n_random = KILLS - len(aimed) - len(finals)
    early = [Kill("time", at=rng.uniform(0.3, 5.0), order=-1.0) for _ in range(3)]  # imports, loading
    steps = [
        Kill("step", at=rng.randint(1, TOTAL_STEPS), jitter=rng.uniform(0, 0.05)) for _ in range(n_random - 3)
    ]
    for k in steps:
        k.order = k.at / TOTAL_STEPS
    rest = aimed + early + steps
    rng.shuffle(rest)
    chains: list[list[Kill]] = [[] for _ in range(CHAINS)]
    for i, k in enumerate(rest):
        chains[i % CHAINS].append(k)
    chains[0] += finals[:2]
    chains[-1].append(finals[2])
    return [sorted(c, key=lambda k: k.order) for c in chains]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crash")
    bert = write_tiny_bert(folder / "bert", dropout=0.1)
    files = {
        "train": write_csv(folder / "train.csv", sentiment_rows(STEPS_PER_EPOCH * 4, seed=1)),
        "validation": write_csv(folder / "validation.csv", sentiment_rows(16, seed=2)),
        "test": write_csv(folder / "test.csv", sentiment_rows(16, seed=3)),
    }
    return folder, bert, files


@pytest.fixture(scope="module")
def reference(setup):
    """An uninterrupted run: what every killed-and-resumed run must reproduce, and what is exported."""
    folder, bert, files = setup
    run = folder / "reference" / "run"
    code, stderr = attempt(train_args(bert, files, run), folder / "reference.log", None)
    assert code == 0, stderr
    return run


def train_args(bert: Path, files: dict[str, Path], out: Path) -> list[str]:
    return ["train", f"model={bert}", "method=full", f"data.train={files['train']}",
            f"data.validation={files['validation']}", f"data.test={files['test']}", f"train.epochs={EPOCHS}",
            "train.batch_size=4", "train.precision=fp32", "train.learning_rate=3e-3", "train.checkpoint_steps=4",
            "train.eval_steps=8", "train.log_steps=1", "train.num_threads=1", "train.progress_bar=false",
            f"output_dir={out}"]  # fmt: skip


def environment(point: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != CRASH_AT}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if point:
        env[CRASH_AT] = point
    return env


def last_step(metrics: Path, since_ns: int) -> int:
    """The step of metrics.jsonl's last whole line, once this process has written the file."""
    try:
        if metrics.stat().st_mtime_ns < since_ns:
            return -1
        lines = metrics.read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else -1
    except (OSError, ValueError, KeyError):
        return -1


def attempt(args: list[str], log: Path, kill: Kill | None, metrics: Path | None = None) -> tuple[int, str]:
    """Run `python -m tunelab ARGS`, killed per `kill` (unless it exits first); (exit code, stderr)."""
    started = time.time_ns()
    with open(log, "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "tunelab", *args], stdout=subprocess.DEVNULL,
                                   stderr=err, env=environment(kill.point if kill and kill.kind == "point" else ""))  # fmt: skip
        try:
            if kill is not None and kill.kind == "time":
                try:
                    process.wait(timeout=kill.at)
                except subprocess.TimeoutExpired:
                    process.send_signal(signal.SIGKILL)
            elif kill is not None and kill.kind == "step":
                assert metrics is not None
                while process.poll() is None and last_step(metrics, started) < kill.at:
                    time.sleep(0.005)
                time.sleep(kill.jitter)
                if process.poll() is None:
                    process.send_signal(signal.SIGKILL)
            process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return process.returncode, log.read_text()


def comparable(run: Path) -> tuple[dict, list[dict]]:
    """What must come out the same however often the run was killed: eval.json's scores and
    every metrics.jsonl line but its timing field."""
    scores = json.loads((run / "eval.json").read_text())
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return ({s: scores[s] for s in ("validation", "test")},
            [{k: v for k, v in e.items() if k not in VOLATILE} for e in lines])  # fmt: skip


def weights(run: Path) -> dict[str, bytes]:
    from safetensors.torch import load_file

    return {n: t.numpy().tobytes() for n, t in load_file(run / "model" / "model.safetensors").items()}


def tree_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def assert_refusal(code: int, stderr: str, what: str) -> str:
    """A clean refusal: exit 2, one line, no traceback; returns the line."""
    assert code == 2 and "Traceback" not in stderr, f"{what}: exit {code}\n{stderr}"
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{what}: not one error line:\n{stderr}"
    return lines[0]


def follow(line: str, plain: list[str], out: Path) -> list[str]:
    """The command a refusal's line says to run next."""
    if f"tunelab train --resume {out}" in line:
        return ["train", "--resume", str(out)]
    if "--overwrite" in line:
        return [*plain, "--overwrite"]
    if "start it with: tunelab train CONFIG" in line:  # stopped before the run's folder existed
        return plain
    raise AssertionError(f"the refusal does not say how to go on: {line}")


def label(command: list[str]) -> str:
    if "--resume" in command:
        return "train --resume RUN"
    return "train CONFIG" + next((f" {a}" for a in command if a in ("train.resume=auto", "--overwrite")), "")


def run_chain(index: int, kills: list[Kill], plain_for, reference: dict, folder: Path) -> list[str]:
    """Apply `kills` one after the other to the run and its resumes, then resume to the end and
    compare with the reference; a run that finishes before its kill lands is checked and the
    rest go to a fresh run. Returns what happened, one line per process."""
    rng = random.Random(SEED * 100 + index)
    story: list[str] = []
    pending = list(kills)
    delivered = 0
    generation = 0
    while True:
        generation += 1
        assert generation <= 3, f"chain {index}: runs keep finishing before the kill lands: {story}"
        out = folder / f"chain{index}-{generation}" / "run"
        out.parent.mkdir()
        plain = plain_for(out)
        command = plain
        refusals = 0
        while True:
            kill = pending[0] if pending else None
            log = out.parent / f"attempt-{len(story)}.log"
            code, stderr = attempt(command, log, kill, out.parent / f".{out.name}.partial" / "metrics.jsonl")
            story.append(f"{label(command)}, kill at {kill}: exit {code}")
            if code == -signal.SIGKILL:
                assert kill is not None, stderr
                pending.pop(0)
                delivered += 1
                refusals = 0
                if out.exists():  # killed after the rename: it must be whole
                    break
                # the plain command again is refused (it says how to resume): less often, as it costs a start
                resume, auto = ["train", "--resume", str(out)], [*plain, "train.resume=auto"]
                command = rng.choices([resume, auto, plain], weights=[4, 4, 2])[0]
                continue
            if code == 0:
                break
            refusals += 1
            assert refusals <= 2, f"refused again after following the message: {story}\n{stderr}"
            command = follow(assert_refusal(code, stderr, str(kill)), plain, out)
        assert comparable(out) == reference["comparable"], f"chain {index} differs after {story}"
        assert weights(out) == reference["weights"], f"chain {index}: other weights after {story}"
        leftovers = sorted(p.name for p in out.parent.iterdir() if not p.name.endswith(".log"))
        assert leftovers == ["run"], f"chain {index} left {leftovers} after {story}"
        hidden = sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".tunelab-run")
        assert not hidden, f"chain {index}: temporary files left in the run: {hidden}"
        if not pending:
            return [*story, f"kills delivered: {delivered}"]


def test_truncated_metrics_line_is_dropped_on_resume(tmp_path):
    """A line cut short by a crash (after the checkpoint's step) is not read as JSON on resume."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    with metrics_log(path, keep_until=2, enabled=True) as log:
        log({"step": 3, "loss": 0.3})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_a_finished_run_stopped_before_its_rename_is_not_trained_again(tmp_path):
    """eval.json written, the rename not done: the plain command says how to finish it (the
    chains below check that --resume and train.resume=auto move it into place)."""
    out = tmp_path / "run"
    partial_dir(out).mkdir()
    (partial_dir(out) / "eval.json").write_text("{}\n")
    config = load_config(overrides=[f"output_dir={out}"])
    with pytest.raises(
        TunelabError, match=f"finish it with: tunelab train --resume {out}; or pass --overwrite"
    ):
        recover_finished(config, out, resume=False, overwrite=False)
    assert recover_finished(config, out, resume=False, overwrite=True) is None  # --overwrite: train afresh
    assert [p.name for p in tmp_path.iterdir()] == [".run.partial"]  # the refusal touched nothing


def test_kill_between_the_epoch_end_evaluation_and_its_checkpoint(setup, reference):
    """Step 12 ends epoch 1: its periodic checkpoint is written, then the epoch-end evaluation
    logs a line, then a second checkpoint. Killed while writing that second one (the 4th
    checkpoint write), the resume starts from the first and evaluates again: the line it had
    already logged must not stay in metrics.jsonl twice (a step number cannot tell them apart;
    the checkpoint counts the lines)."""
    folder, bert, files = setup
    out = folder / "epoch-end" / "run"
    out.parent.mkdir()
    code, stderr = attempt(
        train_args(bert, files, out), out.parent / "killed.log", Kill("point", "checkpoint-write:4")
    )
    assert code == -signal.SIGKILL, stderr
    code, stderr = attempt(["train", "--resume", str(out)], out.parent / "resumed.log", None)
    assert code == 0, stderr
    assert "resuming from step-000012" in stderr
    assert comparable(out) == comparable(reference)


def test_kill_at_any_moment_resumes_to_the_same_metrics_or_says_how(setup, reference):
    folder, bert, files = setup
    rng = random.Random(SEED)
    chains = moments(rng)
    assert sum(map(len, chains)) == KILLS

    def plain_for(out: Path) -> list[str]:
        return train_args(bert, files, out)

    # exact equality, not a tolerance: on CPU with one thread the loop is deterministic and a
    # checkpoint restores every random stream, so a resumed run repeats the same float operations
    expected = {"comparable": comparable(reference), "weights": weights(reference)}
    with ThreadPoolExecutor(max_workers=2) as pool:  # two processes at a time, one thread each
        stories = list(
            pool.map(lambda i: run_chain(i, chains[i], plain_for, expected, folder), range(CHAINS))
        )
    delivered = sum(int(s[-1].split(": ")[1]) for s in stories)
    assert delivered == KILLS, stories


# written, not yet checked; checked, not yet renamed; and a random moment (loading, most likely)
EXPORT_KILLS = [Kill("point", "export-write:1"), Kill("point", "export-rename:1"),
                Kill("time", at=random.Random(SEED).uniform(1.0, 5.0))]  # fmt: skip


def test_kill_export_leaves_nothing_half_written_and_a_rerun_succeeds(setup, reference):
    folder = setup[0]
    run = reference
    before = tree_hash(run)
    out = folder / "exports" / "merged"
    command = ["export", str(run), "--merge", "--out", str(out)]
    for kill in EXPORT_KILLS:
        code, stderr = attempt(command, folder / "export.log", kill)
        if code == 0:  # finished before the kill landed: it must be whole; start again
            assert json.loads((out / "export.json").read_text())["max_abs_diff"] < 1e-3
            for path in sorted(out.rglob("*"), reverse=True):
                path.unlink() if path.is_file() else path.rmdir()
            out.rmdir()
            continue
        assert code == -signal.SIGKILL, stderr
        assert not out.exists(), f"killed at {kill}: {out} exists half-written"
    code, stderr = attempt(command, folder / "export.log", None)
    assert code == 0, stderr
    report = json.loads((out / "export.json").read_text())
    assert report["max_abs_diff"] < 1e-3 and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged"]  # the killed ones' .partial is gone
    assert tree_hash(run) == before  # exporting never changes the run
