"""The `tunelab` command end to end: train, eval, predict, reproduce, and user errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tunelab.cli import main

from .conftest import write_csv


def tunelab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def trained_run(tiny_bert, sentiment_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    result = tunelab(
        "train",
        f"model={tiny_bert}",
        "method=full",
        "full.train_embeddings=true",  # the tiny model's embeddings are random, not pretrained
        f"data.train={sentiment_files['train']}",
        f"data.validation={sentiment_files['validation']}",
        f"data.test={sentiment_files['test']}",
        "train.epochs=2",
        "train.batch_size=8",
        "train.precision=fp32",
        "train.learning_rate=3e-3",
        f"output_dir={out}",
    )
    assert result.returncode == 0, result.stderr
    return out, result


def test_train_writes_a_complete_run_directory(trained_run):
    out, result = trained_run
    assert "trainable params:" in result.stderr
    assert {p.name for p in out.iterdir()} >= {
        "config.yaml",
        "metrics.jsonl",
        "env.json",
        "model",
        "eval.json",
    }
    assert not (out.parent / ".run.partial").exists(), "the temporary directory must be renamed away"
    assert not (out / "checkpoints").exists(), "a finished run keeps no resume state"
    report = json.loads((out / "eval.json").read_text())
    for split in ("validation", "test"):
        metrics = report[split]
        for key in (
            "accuracy",
            "precision_macro",
            "recall_macro",
            "f1_macro",
            "per_class",
            "confusion_matrix",
        ):
            assert key in metrics
        assert sum(map(sum, metrics["confusion_matrix"]["matrix"])) == 32
    assert report["test"]["accuracy"] > 0.8, "the synthetic task is easy: one sentiment word decides"
    train = report["train"]
    for key in (
        "runtime_s",
        "samples_per_s",
        "tokens_per_s",
        "peak_rss_mb",
        "trainable_params",
        "total_params",
    ):
        assert train[key] > 0
    env = json.loads((out / "env.json").read_text())
    assert env["seed"] == 42 and set(env["data_sha256"]) == {"train", "validation", "test"}
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["data"]["labels"] == ["negative", "positive"] and config["method"] == "full"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in line for line in lines) and any(line.get("split") == "validation" for line in lines)


def test_config_yaml_reproduces_the_run(trained_run, tmp_path):
    out, _ = trained_run
    again = tmp_path / "again"
    result = tunelab("train", str(out / "config.yaml"), f"output_dir={again}")
    assert result.returncode == 0, result.stderr
    first = json.loads((out / "eval.json").read_text())
    second = json.loads((again / "eval.json").read_text())
    assert first["test"] == second["test"] and first["validation"] == second["validation"]


def test_predict_text_and_file(trained_run, tmp_path):
    out, _ = trained_run
    result = tunelab("predict", str(out), "the plot was superb and warm")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("positive") and "negative 0." in result.stdout

    reviews = write_csv(tmp_path / "reviews.csv", [{"text": "a sad and dull movie"}, {"text": "lovely film"}])
    predictions = tmp_path / "predictions.jsonl"
    result = tunelab("predict", str(out), "--file", str(reviews), "--output", str(predictions))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [r["label"] for r in rows] == ["negative", "positive"]
    assert rows[0]["text"] == "a sad and dull movie"
    assert sum(rows[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_eval_on_a_file_prints_a_table_and_writes_json(trained_run, sentiment_files, tmp_path):
    out, _ = trained_run
    target = tmp_path / "metrics.json"
    result = tunelab("eval", str(out), "--data", str(sentiment_files["test"]), "--output", str(target))
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout and "confusion matrix" in result.stdout
    saved = json.loads(target.read_text())
    report = json.loads((out / "eval.json").read_text())
    assert saved["accuracy"] == pytest.approx(report["test"]["accuracy"])


def test_existing_run_is_not_overwritten(trained_run, capsys):
    out, _ = trained_run
    before = (out / "eval.json").read_text()
    assert main(["train", str(out / "config.yaml")]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert (out / "eval.json").read_text() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["method=qlora"],
            "method: 'qlora' is not a valid choice; choose one of: full, freeze, lora, adapter, prefix, prompt, ia3",
        ),
        (["data.txt_column=x"], "did you mean 'data.text_column'"),
        (["train.batch_size=big"], "train.batch_size: expected int"),
        (["data.train=missing.csv"], "data file not found: missing.csv"),
        (["model=no/such/path"], "model 'no/such/path' is neither a built-in model"),
    ],
)
def test_user_errors_print_one_line_without_traceback(args, message, tmp_path, capsys):
    code = main(["train", *args, f"output_dir={tmp_path / 'x'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_bad_data_is_reported_before_anything_is_written(tiny_bert, tmp_path, capsys):
    bad = write_csv(tmp_path / "bad.csv", [{"review": "good", "label": "positive"}])
    code = main(["train", f"model={tiny_bert}", f"data.train={bad}", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "no column 'text'" in err and "review, label" in err and "data.text_column" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / ".run.partial").exists()


def test_python_api_mirrors_the_cli(tiny_bert, sentiment_files, tmp_path):
    import tunelab

    run = tunelab.train(
        model=str(tiny_bert),
        method="full",
        train=str(sentiment_files["train"]),
        validation=str(sentiment_files["validation"]),
        epochs=1,
        learning_rate=1e-3,
        output_dir=str(tmp_path / "api"),
        progress_bar=False,
        precision="fp32",
    )
    predictions = tunelab.load(run.path).predict(["good film", "awful film"])
    assert [set(p) for p in predictions] == [{"label", "score", "probabilities"}] * 2
    assert run.config.train.epochs == 1.0 and run.config.method == "full"


def test_overrides_may_follow_flags(monkeypatch):
    import tunelab.run

    seen = {}
    monkeypatch.setattr(
        tunelab.run,
        "train",
        lambda config, overrides, overwrite, resume: seen.update(
            config=config, overrides=overrides, overwrite=overwrite
        ),
    )
    assert main(["train", "c.yaml", "a=1", "--overwrite", "b=2"]) == 0
    assert seen == {"config": "c.yaml", "overrides": ["a=1", "b=2"], "overwrite": True}


@pytest.mark.parametrize("flag", [["--nproc", "2"], ["--nproc=2"]])
def test_nproc_relaunches_the_same_command_under_torchrun(flag, monkeypatch):
    import tunelab.dist

    seen = {}
    monkeypatch.setattr(tunelab.dist, "launch", lambda n, argv, max_restarts: seen.update(n=n, argv=argv,
                        restarts=max_restarts) or 0)  # fmt: skip
    assert main(["train", "c.yaml", *flag, "a=1"]) == 0
    assert seen == {"n": 2, "argv": ["train", "c.yaml", "a=1"], "restarts": 0}


@pytest.mark.parametrize(
    "flags", [["--nproc", "2", "--max-restarts", "3"], ["--max-restarts=3", "--nproc=2"]]
)
def test_max_restarts_is_passed_to_torchrun(flags, monkeypatch):
    import tunelab.dist

    seen = {}
    monkeypatch.setattr(tunelab.dist, "launch", lambda n, argv, max_restarts: seen.update(n=n, argv=argv,
                        restarts=max_restarts) or 0)  # fmt: skip
    assert main(["train", "c.yaml", *flags, "a=1"]) == 0
    assert seen == {"n": 2, "argv": ["train", "c.yaml", "a=1"], "restarts": 3}
    assert main(["train", "c.yaml", "--max-restarts", "1"]) == 0  # one process, still restarted by torchrun
    assert seen == {"n": 1, "argv": ["train", "c.yaml"], "restarts": 1}
    assert main(["train", "c.yaml", "--max-restarts", "-1"]) == 2
