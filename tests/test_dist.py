"""Distributed data parallel through torchrun: 2 CPU processes (gloo) x batch 8 follow the same
loss trajectory as 1 process x batch 16, and the saved model works."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import write_tiny_bert


def run_args(bert, files, out, batch_size):
    return ["train", f"model={bert}", "method=full", "full.train_embeddings=true", f"data.train={files['train']}",
            f"data.validation={files['validation']}", "train.epochs=2", f"train.batch_size={batch_size}",
            "train.precision=fp32", "train.learning_rate=3e-3", "train.log_steps=1", "train.progress_bar=false",
            f"output_dir={out}"]  # fmt: skip


def trajectory(run):
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e["loss"]) for e in lines if "loss" in e and "split" not in e]


def assert_same_trajectory(a, b, steps):
    assert [s for s, _ in a] == [s for s, _ in b] and len(a) == steps
    for (step, x), (_, y) in zip(a, b):
        assert y == pytest.approx(x, rel=1e-3, abs=1e-4), f"step {step}"


def test_two_processes_match_one_process_with_the_global_batch(sentiment_files, tmp_path):
    bert = write_tiny_bert(tmp_path / "bert", dropout=0.0)  # no dropout: the processes' RNGs differ
    single, double = tmp_path / "single", tmp_path / "double"
    one = subprocess.run([sys.executable, "-m", "tunelab", *run_args(bert, sentiment_files, single, 16)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "tunelab", *run_args(bert, sentiment_files, double, 8), "--nproc", "2"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert two.returncode == 0, two.stderr
    assert "2 processes" in two.stderr

    assert_same_trajectory(trajectory(single), trajectory(double), 50)
    first = json.loads((single / "eval.json").read_text())["validation"]
    second = json.loads((double / "eval.json").read_text())["validation"]
    assert second["accuracy"] == pytest.approx(first["accuracy"], abs=1 / 32)

    predicted = subprocess.run([sys.executable, "-m", "tunelab", "predict", str(double), "a lovely warm film"],
                               capture_output=True, text=True, timeout=300)  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr
    assert predicted.stdout.split("\t")[0] in {"positive", "negative"}


def test_fsdp_matches_one_process_and_resumes_after_sigterm(sentiment_files, tmp_path):
    import os
    import signal
    import time

    from tunelab.checkpoint import checkpoint_dirs

    bert = write_tiny_bert(tmp_path / "bert", dropout=0.0)
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    extra = ["train.epochs=6", "train.checkpoint_steps=5"]
    one = subprocess.run([sys.executable, "-m", "tunelab", *run_args(bert, sentiment_files, single, 16), *extra],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr
    process = subprocess.Popen([sys.executable, "-m", "tunelab", *run_args(bert, sentiment_files, sharded, 8), *extra,
                                "train.distributed=fsdp", "--nproc", "2"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    folder = tmp_path / ".sharded.partial" / "checkpoints"
    deadline = time.time() + 300
    while not any(int(p.name.split("-")[1]) >= 10 for p in checkpoint_dirs(folder)):
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGTERM)
    process.communicate(timeout=120)
    assert not sharded.exists() and checkpoint_dirs(folder)

    resumed = subprocess.run([sys.executable, "-m", "tunelab", "train", "--resume", str(sharded), "--nproc", "2"],
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step-" in resumed.stderr

    assert_same_trajectory(trajectory(single), trajectory(sharded), 150)
    predicted = subprocess.run([sys.executable, "-m", "tunelab", "predict", str(sharded), "a lovely warm film"],
                               capture_output=True, text=True, timeout=300)  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr


def test_causal_lm_under_two_processes_follows_one_process(tmp_path):
    """The target-only loss reaches through the DDP wrapper; the token-normalised global step
    gives the same losses as one process with the whole batch."""
    from .conftest import write_tiny_llama

    llama = write_tiny_llama(tmp_path / "llama")
    rows = [{"instruction": f"the {w} was", "output": "good great fine" if i % 2 else "bad"}
            for i, w in enumerate(["movie", "film", "plot", "acting"] * 8)]  # fmt: skip
    (tmp_path / "train.json").write_text(json.dumps(rows))
    runs = {}
    for procs, batch in ((1, 8), (2, 4)):
        out = tmp_path / f"run{procs}"
        args = ["train", f"model={llama}", "task=causal-lm", "method=full", f"data.train={tmp_path / 'train.json'}",
                "train.epochs=2", f"train.batch_size={batch}", "train.precision=fp32", "train.log_steps=1",
                "train.progress_bar=false", "generation.eval_samples=0", f"output_dir={out}"]  # fmt: skip
        done = subprocess.run([sys.executable, "-m", "tunelab", *args, *(["--nproc", "2"] if procs == 2 else [])],
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr
        runs[procs] = trajectory(out)
    assert_same_trajectory(runs[1], runs[2], 8)
