"""Never lose a run: kill -9 mid-epoch and resume to the same result; SIGTERM saves and exits;
runs are not overwritten unless asked; the same seed gives the same numbers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunelab.checkpoint import checkpoint_dirs

from .conftest import write_tiny_bert


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("bert"), dropout=0.1)


def train_args(bert, files, out, *extra):
    return ["train", f"model={bert}", "method=full", f"data.train={files['train']}",
            f"data.validation={files['validation']}", f"data.test={files['test']}", "train.epochs=6",
            "train.precision=fp32", "train.learning_rate=3e-3", "train.checkpoint_steps=5", "train.eval_steps=20",
            "train.log_steps=1", "train.progress_bar=false", f"output_dir={out}", *extra]  # fmt: skip


def start(args):
    return subprocess.Popen([sys.executable, "-m", "tunelab", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def wait_for_checkpoint(process, folder: Path, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(int(p.name.split("-")[1]) >= step for p in checkpoint_dirs(folder)):
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.005)
    raise AssertionError("no checkpoint appeared")


def losses(run: Path) -> list[tuple]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e.get("loss"), e.get("accuracy"), e.get("split")) for e in lines]


@pytest.fixture(scope="module")
def uninterrupted(bert, sentiment_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    result = subprocess.run([sys.executable, "-m", "tunelab", *train_args(bert, sentiment_files, out)],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out


def test_kill_9_mid_epoch_then_resume_gives_the_same_run(bert, sentiment_files, uninterrupted, tmp_path):
    out = tmp_path / "run"
    process = start(train_args(bert, sentiment_files, out))
    wait_for_checkpoint(process, tmp_path / ".run.partial" / "checkpoints", 10)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert not out.exists()
    saved = checkpoint_dirs(tmp_path / ".run.partial" / "checkpoints")
    assert saved and len(saved) <= 2  # keep_checkpoints
    state = json.loads((saved[-1] / "state.json").read_text())["result"]
    assert 0 < state["step_in_epoch"] < 25, "the kill should land inside an epoch"

    result = subprocess.run([sys.executable, "-m", "tunelab", "train", "--resume", str(out)],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "resuming from step-" in result.stderr
    first = json.loads((uninterrupted / "eval.json").read_text())
    second = json.loads((out / "eval.json").read_text())
    assert second["test"] == first["test"] and second["validation"] == first["validation"]
    assert losses(out) == losses(uninterrupted)


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(bert, sentiment_files, uninterrupted, tmp_path):
    out = tmp_path / "run"
    process = start(train_args(bert, sentiment_files, out))
    wait_for_checkpoint(process, tmp_path / ".run.partial" / "checkpoints", 5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert f"resume with: tunelab train --resume {out}" in stderr
    state = json.loads(
        (checkpoint_dirs(tmp_path / ".run.partial" / "checkpoints")[-1] / "state.json").read_text()
    )
    assert f"stopped at step {state['result']['steps']}" in stderr

    again = subprocess.run([sys.executable, "-m", "tunelab", *train_args(bert, sentiment_files, out)],
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert (
        again.returncode == 2
        and "an unfinished run is in the way" in again.stderr
        and "--resume" in again.stderr
    )
    auto = subprocess.run([sys.executable, "-m", "tunelab", *train_args(bert, sentiment_files, out, "train.resume=auto")],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert auto.returncode == 0, auto.stderr
    assert (
        json.loads((out / "eval.json").read_text())["test"]
        == json.loads((uninterrupted / "eval.json").read_text())["test"]
    )


def test_resume_auto_refuses_other_settings(bert, sentiment_files, tmp_path):
    out = tmp_path / "run"
    partial = tmp_path / ".run.partial"
    process = start(train_args(bert, sentiment_files, out))
    wait_for_checkpoint(process, partial / "checkpoints", 5)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    other = subprocess.run([sys.executable, "-m", "tunelab", *train_args(bert, sentiment_files, out,
                            "train.resume=auto", "train.learning_rate=1e-3")], capture_output=True, text=True)  # fmt: skip
    assert other.returncode == 2 and "was started with other settings" in other.stderr
    fresh = subprocess.run([sys.executable, "-m", "tunelab", *train_args(bert, sentiment_files, out, "--overwrite")],
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert fresh.returncode == 0, fresh.stderr
    assert not partial.exists() and (out / "eval.json").exists()


def test_nothing_to_resume(tmp_path, capsys):
    from tunelab.cli import main

    assert main(["train", "--resume", str(tmp_path / "none")]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_env_json_records_what_reproduces_the_run(uninterrupted):
    env = json.loads((uninterrupted / "env.json").read_text())
    for key in (
        "tunelab",
        "torch",
        "transformers",
        "peft",
        "python",
        "platform",
        "device",
        "threads",
        "seed",
    ):
        assert env[key] is not None, key
    assert set(env["data_sha256"]) == {"train", "validation", "test"}
    assert all(len(h) == 64 for h in env["data_sha256"].values())
    assert "git_commit" in env
    assert env["precision"] == {"setting": "fp32", "used": "fp32"}


def test_same_seed_same_numbers_with_deterministic_algorithms(bert, sentiment_files, uninterrupted, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "tunelab", *train_args(bert, sentiment_files, out,
                             "train.deterministic=true")], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert losses(out) == losses(uninterrupted)
    assert (
        json.loads((out / "eval.json").read_text())["test"]
        == json.loads((uninterrupted / "eval.json").read_text())["test"]
    )
