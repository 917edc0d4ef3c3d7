"""Model cards: every export writes a README.md that `huggingface_hub.ModelCard.load` parses,
with the base model, license, tags, data files (and their hashes), hyper-parameters, the run's
metrics in the metadata and the text, the un-tuned baseline beside them where the run scored
one, and code that loads that kind of export."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import yaml
from huggingface_hub import ModelCard

from tunelab.cli import main
from tunelab.config import load_config
from tunelab.model_card import base_model, write_model_card


@pytest.fixture(scope="module")
def card_run(tmp_path_factory, tiny_bert, sentiment_files):
    out = tmp_path_factory.mktemp("card") / "run"
    assert main(["train", f"model={tiny_bert}", "method=lora", f"data.train={sentiment_files['train']}",
                 f"data.validation={sentiment_files['validation']}", f"data.test={sentiment_files['test']}",
                 "train.max_steps=6", "train.learning_rate=1e-2", "train.progress_bar=false",
                 f"output_dir={out}"]) == 0  # fmt: skip
    return out


def metadata_scores(card) -> dict[tuple[str, str], float]:
    return {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}


@pytest.mark.parametrize("flag, kind", [("--merge", "merged"), ("--adapter-only", "adapter")])
def test_merged_and_adapter_exports_carry_a_card_with_the_runs_metrics(flag, kind, card_run, tiny_bert,
                                                                       sentiment_files, tmp_path):  # fmt: skip
    out = tmp_path / kind
    assert main(["export", str(card_run), flag, "--out", str(out)]) == 0
    card = ModelCard.load(out / "README.md")
    evaluation = json.loads((card_run / "eval.json").read_text())
    env = json.loads((card_run / "env.json").read_text())

    assert card.data.base_model == str(tiny_bert) and card.data.license == "unknown"
    assert {"tunelab", "classification", "lora", kind} <= set(card.data.tags)
    assert card.data.library_name == ("transformers" if kind == "merged" else "peft")
    assert card.data.pipeline_tag == "text-classification"
    assert card.data.datasets == [str(sentiment_files[s]) for s in ("train", "validation", "test")]
    assert card.data.model_name == kind and "accuracy" in card.data.metrics
    scores = metadata_scores(card)
    for split in ("validation", "test"):
        for metric in ("accuracy", "f1_macro"):
            assert scores[(split, metric)] == pytest.approx(evaluation[split][metric])
            assert f"| {split} | {metric} | {evaluation[split][metric]:.4f} |" in card.text
    for split, digest in env["data_sha256"].items():
        assert f"| {split} | `{sentiment_files[split]}` | `{digest}` |" in card.text
    assert "| learning_rate | 0.01 |" in card.text and "rank 16" in card.text
    assert "## Intended use and limitations" in card.text
    if kind == "merged":
        assert f'AutoModelForSequenceClassification.from_pretrained("{kind}")' in card.text
    else:
        assert f'PeftModel.from_pretrained(base, "{kind}")' in card.text and "num_labels=2" in card.text
    report = json.loads((out / "export.json").read_text())
    assert f"logits differ by at most {report['max_abs_diff']:.2e}" in card.text


def test_the_untuned_baseline_stands_beside_the_tuned_scores(tmp_path):
    run_dir = tmp_path / "sft"
    run_dir.mkdir()
    (run_dir / "eval.json").write_text(json.dumps({
        "validation": {"loss": 1.25, "perplexity": 3.49, "rougeL": 0.5},
        "baseline": {"validation": {"loss": 2.5, "perplexity": 12.18}},
        "train": {"trainable_params": 10, "total_params": 1000, "learning_rate": 2e-4, "train_examples": 90}}))  # fmt: skip
    (run_dir / "env.json").write_text(json.dumps({"data_sha256": {"train": "ab" * 32}}))
    config = load_config(
        model="smollm2-135m", task="causal-lm", method="lora", train=str(tmp_path / "id.json")
    )
    run = SimpleNamespace(config=config, path=run_dir)
    card = ModelCard.load(write_model_card(run, tmp_path / ".sft-gguf.partial", "gguf",
                                           {"file": "model-q8_0.gguf", "card_notes": ["Greedy tokens: 20/20."]}))  # fmt: skip
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.license == "apache-2.0"
    assert card.data.model_name == "sft-gguf" and card.data.pipeline_tag == "text-generation"
    assert "| split | metric | fine-tuned | un-tuned base model |" in card.text
    assert "| validation | loss | 1.2500 | 2.5000 |" in card.text
    assert "| validation | rougeL | 0.5000 | — |" in card.text
    assert (
        "Greedy tokens: 20/20." in card.text and 'Llama(model_path="sft-gguf/model-q8_0.gguf")' in card.text
    )
    assert "10 of 1,000 (1.00%)" in card.text and "learning_rate (the method's default) | 0.0002" in card.text


def test_the_base_model_of_a_chained_run_is_its_first_model(tmp_path):
    first = tmp_path / "mlm-run"
    first.mkdir()
    (first / "config.yaml").write_text(yaml.safe_dump({"model": "minilm-l6"}))
    assert base_model(str(first)) == ("sentence-transformers/all-MiniLM-L6-v2", "apache-2.0")
    local = tmp_path / "local"
    local.mkdir()
    (local / "README.md").write_text("---\nlicense: mit\n---\n# a model\n")
    assert base_model(str(local)) == (str(local), "mit")
    assert base_model("org/some-model") == ("org/some-model", "unknown")


def test_an_unknown_kind_is_a_programming_error(tmp_path):
    run = SimpleNamespace(config=load_config(), path=tmp_path)
    with pytest.raises(ValueError, match="unknown export kind 'zip'"):
        write_model_card(run, tmp_path, "zip", {})
