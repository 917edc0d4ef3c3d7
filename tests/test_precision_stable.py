"""`train.precision=auto` is decided the same way every time on one machine: the same config and
seed train in the same precision, to identical metrics, while another process loads the CPU.

The precision comes from the CPU's features and a calibration measured once per machine and
cached (tunelab.device); the first run here measures it under load, the second reads it back.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab import device
from tunelab.cli import main


@pytest.fixture
def busy_cpu():
    """Another process spinning on a core for as long as the test runs."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield spinner
    finally:
        spinner.kill()
        spinner.wait(timeout=30)


def train(out: Path, tiny_bert: Path, files: dict[str, Path]) -> None:
    assert main(["train", f"model={tiny_bert}", "method=lora", f"data.train={files['train']}",
                 f"data.validation={files['validation']}", "data.max_train_samples=96", "train.epochs=1",
                 "train.batch_size=16", "train.precision=auto", "train.progress_bar=false", "seed=7",
                 f"output_dir={out}"]) == 0  # fmt: skip


def test_same_config_and_seed_train_in_the_same_precision_under_load(
    busy_cpu, tiny_bert, sentiment_files, tmp_path, monkeypatch
):
    monkeypatch.setenv(device.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(device.RECALIBRATE_ENV, raising=False)
    envs, reports = [], []
    for name in ("first", "second"):
        device.cpu_calibration.cache_clear()  # as a new process would: only the file remembers
        train(tmp_path / name, tiny_bert, sentiment_files)
        assert busy_cpu.poll() is None, "the load ran throughout"
        envs.append(json.loads((tmp_path / name / "env.json").read_text())["precision"])
        reports.append(json.loads((tmp_path / name / "eval.json").read_text()))
    first, second = envs
    assert first["used"] == second["used"] and first["decided_by"] == second["decided_by"]
    assert first.get("cpu_bf16_speedup") == second.get("cpu_bf16_speedup")
    if first["decided_by"].startswith("calibration"):  # this CPU needs its calibration: taken once
        assert (first["calibration"]["source"], second["calibration"]["source"]) == ("measured", "cache")
        assert second["calibration"]["file"] == str(tmp_path / "cache" / "cpu-precision.json")
        assert first["calibration"]["measured_at"] == second["calibration"]["measured_at"]
    assert reports[0]["validation"] == reports[1]["validation"]  # identical metrics, to the last digit
    device.cpu_calibration.cache_clear()
