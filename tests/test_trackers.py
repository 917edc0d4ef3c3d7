"""`train.report_to`: TensorBoard and MLflow hold the same scalars as metrics.jsonl (read back
with each library's own reader), plus the config and eval.json; bad names and missing
libraries are one-line errors at load."""

from __future__ import annotations

import json

import pytest

from tunelab.config import load_config
from tunelab.errors import ConfigError
from tunelab.run import train
from tunelab.trackers import report_scalars, scalars


def test_scalars_are_named_split_slash_metric():
    assert scalars({"step": 3, "epoch": 0.5, "loss": 1.25, "lr": 1e-3}) == {
        "train/epoch": 0.5, "train/loss": 1.25, "train/lr": 1e-3}  # fmt: skip
    assert scalars({"step": 4, "split": "validation", "accuracy": 0.75, "note": "x"}) == {
        "validation/accuracy": 0.75}  # fmt: skip
    assert report_scalars({"test": {"accuracy": 0.5, "per_class": {}}, "train": {"steps": 4}}) == {
        "eval/test/accuracy": 0.5, "eval/train/steps": 4.0}  # fmt: skip


def test_unknown_or_missing_tracker_is_a_one_line_error_at_load(monkeypatch):
    with pytest.raises(ConfigError, match=r"train.report_to\[0\]: 'wandb' is not a valid choice; choose one of: "
                                          r"tensorboard, mlflow, trackio"):  # fmt: skip
        load_config(overrides=["train.report_to=[wandb]"])
    import tunelab.config

    real = tunelab.config.importlib.util.find_spec
    monkeypatch.setattr(tunelab.config.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))  # fmt: skip
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["train.report_to=[tensorboard, mlflow]"])
    assert str(e.value) == ("train.report_to: mlflow is not installed; pip install 'tunelab[mlflow]' "
                            "(or pip install mlflow-skinny)")  # fmt: skip


def test_tensorboard_and_mlflow_hold_what_metrics_jsonl_holds(
    tiny_bert, sentiment_files, tmp_path, monkeypatch
):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = tmp_path / "runs" / "tracked"
    train(model=str(tiny_bert), method="full", overrides=[
        f"data.train={sentiment_files['train']}", f"data.validation={sentiment_files['validation']}",
        f"data.test={sentiment_files['test']}", "data.max_train_samples=64", "train.max_steps=6",
        "train.log_steps=1", "train.eval_steps=3", "train.progress_bar=false", "train.precision=fp32",
        "train.report_to=[tensorboard, mlflow]", f"output_dir={out}"])  # fmt: skip
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = {(tag, line["step"]): value for line in lines for tag, value in scalars(line).items()}
    assert ("train/loss", 6) in expected and ("validation/accuracy", 3) in expected
    report = json.loads((out / "eval.json").read_text())

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    board = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    for key, value in expected.items():
        assert board[key] == pytest.approx(value, rel=1e-6), key  # event files hold float32
    assert board[("eval/test/accuracy", 6)] == pytest.approx(report["test"]["accuracy"])
    assert "config/text_summary" in events.Tags()["tensors"]

    state = json.loads((out / "trackers.json").read_text())
    assert state["tracking_uri"] == (tmp_path / "runs" / "mlruns").resolve().as_uri()
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    run = client.get_run(state["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["train.log_steps"] == "1" and run.data.params["method"] == "full"
    logged = {(tag, m.step): m.value for tag in {t for t, _ in expected} | {"eval/test/accuracy"}
              for m in client.get_metric_history(run.info.run_id, tag)}  # fmt: skip
    assert {k: v for k, v in logged.items() if not k[0].startswith("eval/")} == expected
    assert logged[("eval/test/accuracy", 6)] == report["test"]["accuracy"]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.json", "eval.json"}
    copy = client.download_artifacts(run.info.run_id, "eval.json", str(tmp_path))
    assert json.loads(open(copy).read()) == report


def test_a_run_that_fails_is_marked_failed_in_mlflow(tiny_bert, sentiment_files, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    import tunelab.run

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")

    def broken_fit(*args, **kwargs):
        raise RuntimeError("the loop broke")

    monkeypatch.setattr(tunelab.run, "fit", broken_fit)
    out = tmp_path / "runs" / "broken"
    with pytest.raises(RuntimeError, match="the loop broke"):
        train(model=str(tiny_bert), method="full", overrides=[
            f"data.train={sentiment_files['train']}", "data.max_train_samples=64", "train.progress_bar=false",
            "train.report_to=[mlflow]", f"output_dir={out}"])  # fmt: skip
    state = json.loads((tmp_path / "runs" / ".broken.partial" / "trackers.json").read_text())
    run = MlflowClient(tracking_uri=state["tracking_uri"]).get_run(state["mlflow_run_id"])
    assert run.info.status == "FAILED"


TRACKIO_SCRIPT = """
import json, sys
from tunelab.run import train
from trackio.sqlite_storage import SQLiteStorage
train(overrides=sys.argv[1:])
logs = SQLiteStorage.get_logs("tunelab", "tracked")
print(json.dumps({"logs": logs, "config": SQLiteStorage.get_run_config("tunelab", "tracked")}))
"""


def test_trackio_holds_what_metrics_jsonl_holds(tiny_bert, sentiment_files, tmp_path):
    pytest.importorskip("trackio")
    import os
    import subprocess
    import sys

    out = tmp_path / "tracked"
    # Trackio reads its folder (TRACKIO_DIR) when imported: a process of its own
    done = subprocess.run([sys.executable, "-c", TRACKIO_SCRIPT, f"model={tiny_bert}", "method=full",
                           f"data.train={sentiment_files['train']}", f"data.test={sentiment_files['test']}",
                           "data.max_train_samples=32", "train.max_steps=3", "train.log_steps=1",
                           "train.eval_steps=2", "train.progress_bar=false", "train.precision=fp32",
                           "train.report_to=[trackio]", f"output_dir={out}"],
                          capture_output=True, text=True, timeout=300, check=True,
                          env={**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")})  # fmt: skip
    stored = json.loads(done.stdout.strip().splitlines()[-1])
    logged = {
        (k, row["step"]): v
        for row in stored["logs"]
        for k, v in row.items()
        if k not in ("step", "timestamp")
    }
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = {(tag, line["step"]): value for line in lines for tag, value in scalars(line).items()}
    assert expected and {k: v for k, v in logged.items() if not k[0].startswith("eval/")} == expected
    report = json.loads((out / "eval.json").read_text())
    assert logged[("eval/test/accuracy", 3)] == report["test"]["accuracy"]
    assert stored["config"]["method"] == "full"
