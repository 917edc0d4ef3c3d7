"""`tunelab export --onnx [--int8]`: the ONNX graph reproduces the run's logits when ONNX Runtime
runs it outside tunelab, the int8 graph mostly agrees, export.json holds the check, and what
cannot be exported (a decoder, a method without merge, an existing folder, a failed check)
gets one line and leaves nothing behind."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml

pytest.importorskip("onnxruntime")  # the optional `onnx` extra: without it these tests skip
pytest.importorskip("onnxscript")

from huggingface_hub import ModelCard

from tunelab import onnx_export
from tunelab.cli import main
from tunelab.config import load_config, save_config
from tunelab.run import load

from .conftest import write_csv
from .test_tasks import ner_sentences, regression_rows, write_conll

TEXTS = ["the movie was good", "a dull and grim film", "so happy and warm", "it was cold"]


def train(out, *args) -> None:
    assert (
        main(["train", *args, "train.progress_bar=false", "train.precision=fp32", f"output_dir={out}"]) == 0
    )


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, tiny_bert, sentiment_files):
    """A classifier with a test file, trained until it is right (so int8 labels can agree)."""
    out = tmp_path_factory.mktemp("onnx") / "run"
    train(out, f"model={tiny_bert}", "method=full", "full.train_embeddings=true", f"data.train={sentiment_files['train']}",
          f"data.test={sentiment_files['test']}", "train.epochs=2", "train.learning_rate=3e-3")  # fmt: skip
    return out


@pytest.fixture(scope="module")
def exported(classifier_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx-out") / "sst"
    assert main(["export", str(classifier_run), "--onnx", "--int8", "--out", str(out)]) == 0
    return out


def onnx_logits(folder, file, texts):
    """Logits of an exported graph run by plain ONNX Runtime and the exported tokenizer."""
    import onnxruntime
    from transformers import AutoTokenizer

    session = onnxruntime.InferenceSession(str(folder / file), providers=["CPUExecutionProvider"])
    batch = AutoTokenizer.from_pretrained(folder)(texts, padding=True, return_tensors="np")
    feed = {i.name: batch[i.name].astype(np.int64) for i in session.get_inputs()}
    return session.run(["logits"], feed)[0]


def test_the_onnx_graph_gives_the_runs_logits(classifier_run, exported):
    run = load(classifier_run)
    reference = np.stack(run.logits(run.task.encode_inputs(TEXTS, run.tokenizer)))
    assert onnx_logits(exported, "model.onnx", TEXTS) == pytest.approx(reference, abs=1e-4)
    config = json.loads((exported / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert {p.name for p in exported.iterdir()} >= {"README.md", "export.json", "model.onnx", "model_quantized.onnx",
                                                    "tunelab_config.yaml", "tokenizer_config.json", "config.json"}  # fmt: skip


def test_export_json_holds_the_check_on_the_test_split(classifier_run, exported):
    report = json.loads((exported / "export.json").read_text())
    evaluation = json.loads((classifier_run / "eval.json").read_text())
    assert report["kind"] == "onnx" and report["metric"] == "accuracy"
    assert report["held_out"] == {"split": "test", "file": report["held_out"]["file"], "examples": 32}
    assert report["held_out"]["file"].endswith("test.csv")
    models = report["models"]
    assert set(models) == {"pytorch", "onnx", "int8"}
    # the PyTorch model scores what the run scored on the same rows
    assert models["pytorch"]["metric_value"] == pytest.approx(evaluation["test"]["accuracy"])
    assert report["run_metric_value"] == pytest.approx(evaluation["test"]["accuracy"])
    assert models["onnx"]["max_abs_diff"] == report["max_abs_diff"] < 1e-3
    assert models["onnx"]["label_agreement"] == 1.0
    assert models["onnx"]["metric_value"] == pytest.approx(models["pytorch"]["metric_value"])
    assert models["int8"]["label_agreement"] >= 0.9
    assert abs(models["int8"]["metric_value"] - models["pytorch"]["metric_value"]) <= 0.1
    assert models["int8"]["size_mb"] < models["onnx"]["size_mb"]
    for name, m in models.items():
        assert set(m["latency_ms"]) == {"batch_1", "batch_32"} and min(m["latency_ms"].values()) > 0, name
    for name in ("onnx", "int8"):
        ratio = models["pytorch"]["latency_ms"]["batch_1"] / models[name]["latency_ms"]["batch_1"]
        assert models[name]["speedup"]["batch_1"] == pytest.approx(ratio, rel=0.01)


def test_the_onnx_export_has_a_model_card_with_the_figures(exported):
    card = ModelCard.load(exported / "README.md")
    assert "onnx" in card.data.tags and card.data.library_name == "onnx"
    report = json.loads((exported / "export.json").read_text())
    assert f"{report['models']['int8']['metric_value']:.4f}" in card.text
    assert "onnxruntime.InferenceSession" in card.text and "model_quantized.onnx" in card.text


@pytest.mark.parametrize("task", ["regression", "token-classification"])
def test_regression_and_token_runs_export_too(task, tiny_bert, tmp_path):
    from .conftest import write_tiny_bert

    if task == "regression":
        data = [f"data.train={write_csv(tmp_path / 'train.csv', regression_rows(120, 1))}",
                f"data.test={write_csv(tmp_path / 'test.csv', regression_rows(20, 2))}", "data.label_column=score"]  # fmt: skip
        model = tiny_bert
    else:
        data = [f"data.train={write_conll(tmp_path / 'train.txt', ner_sentences(80, 1))}",
                f"data.test={write_conll(tmp_path / 'test.txt', ner_sentences(20, 2))}"]  # fmt: skip
        model = write_tiny_bert(tmp_path / "bert", extra_words=["anna", "bruno", "carla", "smith", "jones",
                                                                "paris", "rome", "oslo", "visited"])  # fmt: skip
    run_dir, out = tmp_path / "run", tmp_path / "onnx"
    # lora: the export merges the adapter into plain weights first
    train(run_dir, f"model={model}", f"task={task}", "method=lora", "train.max_steps=4", *data)
    assert main(["export", str(run_dir), "--onnx", "--out", str(out)]) == 0
    report = json.loads((out / "export.json").read_text())
    assert report["metric"] == ("mse" if task == "regression" else "f1_micro")
    assert report["max_abs_diff"] < 1e-3 and report["held_out"]["split"] == "test"
    agreement = report["models"]["onnx"]["label_agreement"]
    assert agreement is None if task == "regression" else agreement == 1.0
    assert report["models"]["onnx"]["metric_value"] == pytest.approx(report["models"]["pytorch"]["metric_value"],
                                                                      abs=1e-4)  # fmt: skip


def fake_run(folder, **settings):
    """A run folder as far as the export's early checks read it: config.yaml and model/."""
    folder.mkdir()
    (folder / "model").mkdir()
    save_config(load_config(**settings), folder / "config.yaml")
    return folder


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"task": "causal-lm", "method": "lora"}, "--onnx exports encoder runs (classification, token-classification, "
                                                  "regression); {run} is a causal-lm run"),
        ({"task": "seq2seq", "method": "lora"}, "is a seq2seq run"),
        ({"task": "classification", "method": "prefix"}, "method prefix cannot be merged"),
    ],
)  # fmt: skip
def test_what_cannot_be_exported_says_so_and_writes_nothing(settings, message, tmp_path, capsys):
    run_dir = fake_run(tmp_path / "run", model="minilm-l6", **settings)
    assert main(["export", str(run_dir), "--onnx", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message.format(run=run_dir) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))


def test_an_existing_folder_a_failed_check_and_missing_data_write_nothing(classifier_run, tmp_path, monkeypatch,
                                                                           capsys):  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    assert main(["export", str(classifier_run), "--onnx", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and not any(out.iterdir())
    out.rmdir()

    monkeypatch.setattr(onnx_export, "TOLERANCE", -1.0)  # any difference, even 0, now fails
    assert main(["export", str(classifier_run), "--onnx", "--int8", "--out", str(out)]) == 2
    assert "export check failed: model.onnx's logits differ" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    monkeypatch.undo()

    moved = tmp_path / "moved-run"
    shutil.copytree(classifier_run, moved)
    config = yaml.safe_load((moved / "config.yaml").read_text())
    config["data"]["test"] = str(tmp_path / "gone.csv")
    (moved / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["export", str(moved), "--onnx", "--out", str(out)]) == 2
    assert f"{tmp_path / 'gone.csv'}: the run's test data is not there any more" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_int8_needs_onnx(classifier_run, tmp_path, capsys):
    assert main(["export", str(classifier_run), "--merge", "--int8", "--out", str(tmp_path / "x")]) == 2
    assert "--int8 quantizes an ONNX export: use it with --onnx" in capsys.readouterr().err
    assert main(["export", str(classifier_run), "--merge", "--onnx", "--out", str(tmp_path / "x")]) == 2
    assert "choose one: --merge, --adapter-only or --onnx" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
