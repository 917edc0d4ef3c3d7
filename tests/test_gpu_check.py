"""The GPU path, checked without a GPU: benchmarks/gpu_check.py's CPU smoke run (`--device cpu
--quick`), the speed layer staying off on CUDA, and QLoRA's refusal where it cannot run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tunelab import speed
from tunelab.config import QUANTIZE_NEEDS, load_config
from tunelab.errors import ConfigError
from tunelab.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str]:
    out = tmp_path_factory.mktemp("gpu-check") / "table.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick", "--steps", "2",
         "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert out.is_file(), done.stderr[-3000:]
    return done.returncode, out.read_text()


def rows_of(text: str) -> dict[str, str]:
    """check -> result, from the Markdown table."""
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): cells[-1].strip() for cells in rows[1:]}


def test_cpu_smoke_run_passes_and_skips_only_the_gpu_only_checks(table):
    code, text = table
    rows = rows_of(text)
    assert code == 0, text
    assert not [c for c, r in rows.items() if r.startswith("fail")], text
    passed = {c for c, r in rows.items() if r == "pass"}
    assert {"classification full", "classification lora", "causal-lm lora"} <= passed, text
    assert {"generation (causal-lm lora run)", "HF peer: classification lora (Trainer + peft)"} <= passed
    assert rows["QLoRA 4-bit (causal-lm lora)"] == f"skipped: {QUANTIZE_NEEDS}"
    assert rows["fp16 autocast (classification lora)"].startswith("skipped: fp16")
    assert text.startswith("gpu_check on cpu") and "peak RSS MB" in text


def test_speed_layer_stays_off_off_the_cpu_and_says_why(tiny_bert):
    config = load_config(model=str(tiny_bert), method="lora", labels=["negative", "positive"])
    task = TASKS["classification"](config)
    model = task.build_model(str(tiny_bert))
    from tunelab.methods import METHODS

    model = METHODS["lora"].apply(model, config, task)
    before = [type(m).__name__ for m in model.modules()]
    report = speed.apply(model, task, cpu=False)
    assert report.applied == {}
    assert set(report.skipped) >= {speed.DROPOUT, speed.FROZEN_LINEAR, speed.LORA_LINEAR, speed.ATTENTION}
    assert all("not training on a CPU" in why for why in report.skipped.values())
    assert [type(m).__name__ for m in model.modules()] == before  # nothing swapped
    assert speed.apply(model, task, cpu=True).applied  # while on a CPU they apply


def test_qlora_is_refused_before_loading_where_it_cannot_run(tiny_bert):
    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without a CUDA GPU")
    with pytest.raises(ConfigError) as refused:
        load_config(model=str(tiny_bert), method="lora", **{"lora.quantize": "4bit"})
    assert str(refused.value) == QUANTIZE_NEEDS
    with pytest.raises(ConfigError, match="applies to method=lora"):
        load_config(model=str(tiny_bert), method="full", **{"lora.quantize": "4bit"})
    config = load_config(model=str(tiny_bert), method="lora")
    assert config.lora.quantize == "none"
    assert TASKS["classification"](config).pretrained_options() == {}  # plain loading
