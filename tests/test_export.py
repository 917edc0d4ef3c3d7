"""`tunelab export`: merged and adapter folders load in plain transformers / peft (tunelab's own
code blocked from import) with the run's outputs, and a bad export never lands."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tunelab import export as export_module
from tunelab.cli import main
from tunelab.run import load

from .conftest import write_tiny_llama

TEXTS = ["the movie was good", "a dull and grim film"]

# Loads an export the way a user without tunelab would; prints the logits as JSON.
PLAIN_LOAD = """
import json, sys
sys.modules["tunelab"] = None  # importing tunelab now fails: the export must stand alone
import torch, transformers
kind, folder, auto, base = sys.argv[1:5]
texts = json.loads(sys.argv[5])
tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
if kind == "merged":
    model = getattr(transformers, auto).from_pretrained(folder)
else:
    import peft
    labels = json.loads(sys.argv[6])
    base_model = getattr(transformers, auto).from_pretrained(base, num_labels=len(labels))
    model = peft.PeftModel.from_pretrained(base_model, folder)
model.eval()
batch = tokenizer(texts, padding=True, return_tensors="pt")
batch.pop("token_type_ids", None)
with torch.no_grad():
    logits = model(**batch).logits
print(json.dumps({"logits": logits.tolist(), "id2label": getattr(model.config, "id2label", None)}))
"""


def plain_load(*args):
    done = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_bert, sentiment_files):
    out = tmp_path_factory.mktemp("export") / "run"
    code = main(["train", f"model={tiny_bert}", "method=lora", f"data.train={sentiment_files['train']}",
                 "train.max_steps=6", "train.learning_rate=1e-2", "train.progress_bar=false", f"output_dir={out}"])  # fmt: skip
    assert code == 0
    return out


def run_probabilities(run_dir):
    import numpy as np

    run = load(run_dir)
    return np.array([[p["probabilities"][n] for n in ("negative", "positive")] for p in run.predict(TEXTS)])


def softmax(rows):
    import numpy as np

    x = np.array(rows)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_merged_classifier_loads_in_plain_transformers(lora_run, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["export", str(lora_run), "--merge", "--out", str(out)]) == 0
    assert "logits differ from the run's by at most" in capsys.readouterr().err
    report = json.loads((out / "export.json").read_text())
    assert report["kind"] == "merged" and report["max_abs_diff"] < 1e-3 and report["examples"] > 0
    assert (out / "model.safetensors").is_file()
    loaded = plain_load("merged", str(out), "AutoModelForSequenceClassification", "", json.dumps(TEXTS))
    assert loaded["id2label"] == {"0": "negative", "1": "positive"}
    assert softmax(loaded["logits"]) == pytest.approx(run_probabilities(lora_run), abs=1e-4)


def test_adapter_folder_loads_in_peft_with_its_head(lora_run, tiny_bert, tmp_path):
    out = tmp_path / "adapter"
    assert main(["export", str(lora_run), "--adapter-only", "--out", str(out)]) == 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    loaded = plain_load("adapter", str(out), "AutoModelForSequenceClassification", str(tiny_bert),
                        json.dumps(TEXTS), json.dumps(["negative", "positive"]))  # fmt: skip
    assert softmax(loaded["logits"]) == pytest.approx(run_probabilities(lora_run), abs=1e-4)


def test_merged_causal_lm_keeps_its_template_and_stops_at_end_of_turn(tmp_path):
    llama = write_tiny_llama(tmp_path / "llama")
    rows = [{"instruction": "the movie was", "output": "good great"}] * 16
    (tmp_path / "train.json").write_text(json.dumps(rows))
    run_dir, out = tmp_path / "run", tmp_path / "merged"
    assert main(["train", f"model={llama}", "task=causal-lm", "method=lora", f"data.train={tmp_path / 'train.json'}",
                 "train.max_steps=2", "train.progress_bar=false", "generation.eval_samples=0",
                 f"output_dir={run_dir}"]) == 0  # fmt: skip
    assert main(["export", str(run_dir), "--merge", "--out", str(out)]) == 0
    report = json.loads((out / "export.json").read_text())
    assert report["chat_template"] == "same as training" and report["max_abs_diff"] < 1e-3
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == report["stop_token_ids"] == [3]  # [SEP], this tokenizer's eos
    assert "### Response:" in (out / "chat_template.jinja").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--merge", "--adapter-only"], "choose one: --merge"),
        ([], "choose one: --merge"),
    ],
)
def test_export_needs_one_kind(args, message, lora_run, tmp_path, capsys):
    assert main(["export", str(lora_run), *args, "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_methods_that_cannot_export_that_way_say_so(tiny_bert, sentiment_files, tmp_path, capsys):
    for method, flag, message in (("prefix", "--merge", "method prefix cannot be merged"),
                                  ("full", "--adapter-only", "use --merge (the run already is plain weights)")):  # fmt: skip
        run_dir = tmp_path / method
        assert main(["train", f"model={tiny_bert}", f"method={method}", f"data.train={sentiment_files['train']}",
                     "train.max_steps=1", "train.progress_bar=false", f"output_dir={run_dir}"]) == 0  # fmt: skip
        capsys.readouterr()
        assert main(["export", str(run_dir), flag, "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_failed_check_writes_nothing(lora_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export_module, "TOLERANCE", -1.0)  # any difference, even 0, now fails
    out = tmp_path / "merged"
    assert main(["export", str(lora_run), "--merge", "--out", str(out)]) == 2
    assert "export check failed" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".merged*"))
    monkeypatch.undo()
    out.mkdir()
    assert main(["export", str(lora_run), "--merge", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
