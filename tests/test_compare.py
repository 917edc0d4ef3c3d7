"""`tunelab compare`: every method as an ordinary run, the no-training baselines, a report whose
recommendation follows its table, resuming, and the HTML report in headless Chromium."""

from __future__ import annotations

import json
import math

import pytest

from tunelab.cli import main
from tunelab.compare import Row, pareto, parse_budget, recommend
from tunelab.config import load_config
from tunelab.errors import ConfigError
from tunelab.run import load

from .test_serve import browser  # noqa: F401  (the headless Chromium fixture)


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_bert, sentiment_files):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("compare") / "cmp"
    args = ["compare", f"model={tiny_bert}", f"data.train={sentiment_files['train']}",
            f"data.test={sentiment_files['test']}", "train.learning_rate=3e-3", "--methods", "none,full,lora",
            "--epochs", "2", "--seeds", "2", "--max-memory", "100000", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    return out, args


def test_compare_writes_runs_a_table_and_a_recommendation(compared):
    out, _ = compared
    results = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows) == ["none", "full", "lora"]
    for method in ("full", "lora"):
        assert rows[method]["runs"] == [f"{method}-seed42", f"{method}-seed43"]
        assert len(rows[method]["scores"]) == 2 and rows[method]["trainable_params"] > 0
        assert rows[method]["artifact_mb"] > 0 and rows[method]["peak_rss_mb"] > 0
        load(out / f"{method}-seed42")  # each is an ordinary run directory
    assert rows["none"]["trainable_params"] == 0 and rows["none"]["scores"][0] > 0.9  # TF-IDF finds the words
    best = max((r for r in results["rows"] if r["method"] != "none"), key=lambda r: r["score"])
    assert results["recommendation"].startswith(f"Best accuracy: {best['method']} ({best['score']:.4f})")
    assert "Within 100000 MB of memory" in results["recommendation"]
    md = (out / "report.md").read_text()
    assert "| full | " in md and "± " in md and results["recommendation"] in md


def test_an_interrupted_compare_keeps_finished_runs(compared, capsys):
    out, args = compared
    (out / "lora-seed43" / "eval.json").unlink()  # as if the compare had stopped during this run
    before = (out / "full-seed42" / "eval.json").stat().st_mtime
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "full-seed42 is done already; kept" in err and "lora-seed43 ..." in err
    assert (out / "full-seed42" / "eval.json").stat().st_mtime == before
    assert (out / "lora-seed43" / "eval.json").is_file()


def test_the_report_renders_in_headless_chromium(compared, browser, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By

    out, _ = compared
    browser.get((out / "report.html").as_uri())
    rows = browser.find_elements(By.CSS_SELECTOR, "#results tbody tr")
    assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows] == ["none", "full", "lora"]
    images = browser.find_elements(By.TAG_NAME, "img")
    assert {i.get_attribute("id") for i in images} == {"plot-params", "plot-time", "plot-curves"}
    assert all(browser.execute_script("return arguments[0].naturalWidth", i) > 100 for i in images)
    assert browser.find_element(By.ID, "recommendation").text.startswith("Recommendation. Best accuracy:")
    browser.save_screenshot(str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").stat().st_size > 1000


def row(method, score, time, trainable, memory=1000.0):
    return Row(
        method, scores=[score], train_s=[time], trainable=trainable, peak_rss_mb=[memory], samples_per_s=[1.0]
    )


def test_recommendation_and_pareto_follow_the_numbers():
    rows = [row("none", 0.70, 1, 0), row("full", 0.90, 100, 10**6, 3000), row("lora", 0.895, 40, 10**4, 1500),
            row("prompt", 0.80, 60, 10**3, 1400)]  # fmt: skip
    assert pareto(rows, higher=True) == {"none", "full", "lora"}  # prompt is slower and worse than lora
    text = recommend(rows, "accuracy", True, max_memory=2000, max_time=None)
    assert text.startswith("Best accuracy: full (0.9000)")
    assert "lora comes within 0.0050 of it (0.8950) in 40 s with 10,000 trainable parameters" in text
    assert "Within 2000 MB of memory: lora (0.8950" in text
    assert "Without training (none) the accuracy is 0.7000; fine-tuning with full gains 0.2000" in text
    low = recommend([row("full", 1.5, 10, 5), row("lora", 1.2, 20, 2)], "loss", False, None, 0.2)
    assert low.startswith("Best loss: lora (1.2000)") and "Within 0.2 min of training: full" in low
    assert "No method fits" in recommend(rows, "accuracy", True, max_memory=10, max_time=None)
    assert math.isnan(Row("x").score)


def test_bad_compare_options_are_refused(tiny_bert, sentiment_files, capsys):
    assert parse_budget("90s") == 1.5 and parse_budget("2h") == 120 and parse_budget("10") == 10
    with pytest.raises(ConfigError, match="--budget: 'soon' is not a time"):
        parse_budget("soon")
    assert main(["compare", f"model={tiny_bert}", f"data.train={sentiment_files['train']}", "--methods",
                 "lora,qlora"]) == 2  # fmt: skip
    assert "--methods: unknown qlora" in capsys.readouterr().err


def test_prompted_baseline_for_a_decoder_scores_label_likelihoods(tmp_path, sentiment_files):
    from tunelab.compare import no_training_baseline

    from .conftest import write_tiny_llama

    llama = write_tiny_llama(tmp_path / "llama")
    config = load_config(
        model=str(llama), train=str(sentiment_files["train"]), test=str(sentiment_files["test"])
    )
    report = no_training_baseline(config)
    assert report["baseline"] == "few-shot prompting (label likelihood)"
    scores = report["test"]
    # the scores are those of real predictions on the test file: each row of the confusion
    # matrix holds that label's test rows, and accuracy is its diagonal share
    import csv

    with open(sentiment_files["test"]) as f:
        truth = [row["label"] for row in csv.DictReader(f)]
    labels, matrix = scores["confusion_matrix"]["labels"], scores["confusion_matrix"]["matrix"]
    assert [sum(row) for row in matrix] == [truth.count(label) for label in labels]
    assert scores["num_examples"] == len(truth) == 32
    assert scores["accuracy"] == pytest.approx(sum(matrix[i][i] for i in range(len(labels))) / len(truth))
    assert report["train"]["trainable_params"] == 0


def test_a_time_budget_stops_training_and_keeps_the_best(tiny_bert, sentiment_files, tmp_path):
    from tunelab.run import train

    run = train(model=str(tiny_bert), train=str(sentiment_files["train"]), output_dir=str(tmp_path / "run"),
                progress_bar=False, epochs=50, **{"train.max_minutes": 1e-6})  # fmt: skip
    report = json.loads((run.path / "eval.json").read_text())["train"]
    assert report["steps"] == 1 and report["stopped_early"] and report["best_step"] == 1


def test_lr_sweep_keeps_the_rate_with_the_best_validation_score(tiny_bert, sentiment_files, tmp_path):
    out = tmp_path / "sweep"
    assert main(["compare", f"model={tiny_bert}", f"data.train={sentiment_files['train']}", "--methods", "full",
                 "--epochs", "1", "--lr-sweep", "--out", str(out)]) == 0  # fmt: skip
    runs = sorted(p.name for p in out.iterdir() if p.name.startswith("full-"))
    assert runs == ["full-seed42-lr0.0001", "full-seed42-lr0.0003", "full-seed42-lr3.33e-05"]
    validation = {}
    for name in runs:
        report = json.loads((out / name / "eval.json").read_text())
        validation[report["train"]["learning_rate"]] = report["validation"]["accuracy"]
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert validation[row["learning_rate"]] == max(validation.values())
    assert sorted(validation) == pytest.approx([1e-4 / 3, 1e-4, 3e-4])
