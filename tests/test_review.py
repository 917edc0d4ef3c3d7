"""`tunelab review`: the statistics (Wilson interval, Cohen's kappa), the blind page's mapping of
answer 1/2 back to A/B, resuming, the report and the export, the CLI's refusals, and in headless
Chromium a reviewer rating 6 items of a run against the model it started from; the exported pairs
then train `task=preference`."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient

from tunelab.cli import main
from tunelab.review.app import create_review_app, swapped
from tunelab.review.report import cohen_kappa, report, wilson
from tunelab.review.store import FILE, Review

from .test_serve import ANSWER, browser, free_port, trained_chat  # noqa: F401 - browser is a fixture

httpx = pytest.importorskip("httpx")
PROMPTS = ["the movie was", "the film was", "the plot was", "the acting was", "the movie and", "the plot and"]


def test_wilson_interval_and_cohen_kappa_match_textbook_values():
    low, high = wilson(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    low, high = wilson(10, 10)
    assert round(low, 4) == 0.7225 and high == pytest.approx(1.0)
    assert wilson(0, 0) == (0.0, 1.0)
    # two raters, 10 items: agree on 7; marginals a: 6/4, b: 5/5 -> p_e = 0.5, kappa = 0.4
    first = ["a"] * 6 + ["b"] * 4
    second = ["a"] * 4 + ["b"] * 2 + ["b"] * 3 + ["a"]
    assert cohen_kappa(first, second) == pytest.approx(0.4)
    assert cohen_kappa(["a", "a"], ["a", "a"]) is None


def make_review(folder: Path, n: int = 4) -> Review:
    return Review.create(folder, "runs/new", "runs/old",
                         [(f"prompt {i}", f"new answer {i}", f"old answer {i}") for i in range(n)])  # fmt: skip


def test_the_page_is_blind_and_maps_picks_back_to_the_models(tmp_path):
    folder = tmp_path / "review"
    make_review(folder).close()
    client = TestClient(create_review_app(folder))
    seed = Review(folder).meta()["created"]
    shown = []
    for _ in range(4):
        item = client.get("/api/next", params={"reviewer": "ana"}).json()["item"]
        first_is_b = swapped(seed, item["id"], "ana")
        assert item["answers"][0].startswith("old" if first_is_b else "new")
        assert set(item) == {"id", "prompt", "answers"}  # nothing says which model wrote which
        shown.append(first_is_b)
        assert client.post("/api/rate", json={"item": item["id"], "reviewer": "ana", "pick": "1",
                                              "score": 4}).status_code == 200  # fmt: skip
    assert client.get("/api/next", params={"reviewer": "ana"}).json() == {"done": 4, "total": 4, "item": None}
    choices = [r["choice"] for r in Review(folder).ratings()]
    assert choices == ["b" if s else "a" for s in shown]  # "1" is whichever model was shown first
    assert len(set(swapped(seed, i, r) for i in range(1, 30) for r in ("ana", "bo"))) == 2
    refused = [
        client.get("/api/next", params={"reviewer": ""}),
        client.get("/api/next", params={"reviewer": "<script>"}),
        client.post("/api/rate", json={"item": 99, "reviewer": "ana", "pick": "1"}),
        client.post("/api/rate", json={"item": 1, "reviewer": "ana", "pick": "A"}),
        client.post("/api/rate", json={"item": 1, "reviewer": "ana", "pick": "1", "score": 6}),
    ]
    assert [r.status_code for r in refused] == [422, 422, 404, 422, 422]


def test_report_and_export_with_two_reviewers(tmp_path, capsys):
    folder = tmp_path / "review"
    review = make_review(folder)
    votes = {"ana": ["a", "a", "b", "tie"], "bo": ["a", "b", "b", "skip"]}
    for reviewer, choices in votes.items():
        for item, choice in enumerate(choices, start=1):
            review.rate(item, reviewer, choice, 5 if choice == "a" else None, None)
    review.rate(1, "ana", "a", 3, "changed my mind on the score")  # a second rating replaces the first
    review.close()
    r = report(folder)
    assert (r["a_wins"], r["b_wins"], r["ties"], r["skips"], r["ratings"]) == (3, 3, 1, 1, 7)
    assert r["win_rate_a"] == pytest.approx(3.5 / 7)
    assert r["ci95"] == pytest.approx(list(wilson(3.5, 7)))
    (pair,) = r["agreement"]["pairs"]
    assert (
        pair["reviewers"] == ["ana", "bo"]
        and pair["items"] == 3
        and pair["agreement"] == pytest.approx(2 / 3)
    )
    assert [(p["a"], p["b"], p["tie"], p["skip"], p["mean_score"]) for p in r["per_prompt"]] == [
        (2, 0, 0, 0, 4.0), (1, 1, 0, 0, 5.0), (0, 2, 0, 0, None), (0, 0, 1, 1, None)]  # fmt: skip
    assert main(["review", "--report", str(folder), "--export", str(folder), "--output",
                 str(tmp_path / "pairs.jsonl")]) == 0  # fmt: skip
    out = capsys.readouterr()
    assert "win rate of A: 0.500 (95% CI" in out.out and "agreement ana / bo: 0.67 on 3 items" in out.out
    assert json.loads((folder / "report.json").read_text())["win_rate_a"] == pytest.approx(0.5)
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert pairs == [  # item 2 is one vote each way and item 4 a tie: undecided, left out
        {"prompt": "prompt 0", "chosen": "new answer 0", "rejected": "old answer 0"},
        {"prompt": "prompt 2", "chosen": "old answer 2", "rejected": "new answer 2"},
    ]


def test_review_refusals_are_one_line(tmp_path, capsys):
    cases = [
        (["review"], "give two models"),
        (["review", "a", "b", "--baseline", "--prompts", "p.txt"], "give two models"),
        (["review", "--report", str(tmp_path)], "no review here"),
        (
            [
                "review",
                str(tmp_path / "nope"),
                "--baseline",
                "--prompts",
                str(tmp_path / "p.txt"),
                "--dir",
                str(tmp_path / "r"),
                "--no-page",
            ],
            "p.txt",
        ),  # fmt: skip
    ]
    for argv, phrase in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and phrase in err[0], (argv, err)
    assert not (tmp_path / "r").exists()


def test_a_baseline_review_is_made_once_and_resumes(tmp_path_factory, tmp_path, capsys):
    run = trained_chat(tmp_path_factory)
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:3]) + "\n\n")
    argv = ["review", str(run), "--baseline", "--prompts", str(tmp_path / "p.txt"), "--dir", str(tmp_path / "r"),
            "--no-page"]  # fmt: skip
    assert main(argv) == 0
    items = Review(tmp_path / "r").items()
    assert [i.prompt for i in items] == PROMPTS[:3]
    assert all(i.answer_a == ANSWER for i in items)  # the tuned run
    assert all(i.answer_b != ANSWER for i in items)  # the random model it started from
    capsys.readouterr()
    assert main(argv) == 0
    assert "resuming" in capsys.readouterr().err


def test_six_items_rated_in_headless_chromium_then_the_pairs_train(browser, tmp_path_factory, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    run = trained_chat(tmp_path_factory)
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    port, folder = free_port(), tmp_path / "review"
    server = subprocess.Popen([sys.executable, "-m", "tunelab", "review", str(run), "--baseline", "--prompts",
                               str(tmp_path / "p.txt"), "--dir", str(folder), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the review page did not start"
                time.sleep(0.3)
        items = {i.prompt: i for i in Review(folder).items()}
        browser.get(f"http://127.0.0.1:{port}/")
        browser.find_element(By.ID, "reviewer").send_keys("ana")
        browser.find_element(By.ID, "start").click()
        # A (the tuned run) wins 3, B (its starting model) 1, one tie, one skip
        plan = ["a", "a", "a", "b", "tie", "skip"]
        for n, want in enumerate(plan):
            WebDriverWait(browser, 30).until(
                lambda d, n=n: d.find_element(By.ID, "progress").text.startswith(f"{n} of 6")
            )
            prompt = browser.find_element(By.ID, "prompt").text
            first = browser.find_element(By.ID, "answer1").text
            a_first = first == items[prompt].answer_a.strip()
            if n == 0:
                browser.find_element(By.ID, "score").send_keys("5")
                browser.find_element(By.ID, "comment").send_keys("clearly on topic")
                browser.save_screenshot(str(tmp_path / "review.png"))
            button = {"tie": "tie", "skip": "skip"}.get(want) or (
                "pick1" if (want == "a") == a_first else "pick2"
            )
            browser.find_element(By.ID, button).click()
        WebDriverWait(browser, 30).until(lambda d: "All 6 items done" in d.find_element(By.ID, "status").text)
        assert (tmp_path / "review.png").stat().st_size > 1000
    finally:
        server.terminate()
        server.wait(timeout=30)
    db = sqlite3.connect(folder / FILE)
    rows = db.execute("SELECT reviewer, choice, score, comment FROM ratings ORDER BY id").fetchall()
    db.close()
    assert rows == [("ana", "a", 5, "clearly on topic"), ("ana", "a", None, None), ("ana", "a", None, None),
                    ("ana", "b", None, None), ("ana", "tie", None, None), ("ana", "skip", None, None)]  # fmt: skip
    assert main(["review", "--report", str(folder)]) == 0
    r = json.loads((folder / "report.json").read_text())
    assert r["win_rate_a"] == pytest.approx(3.5 / 5) and r["ci95"] == pytest.approx(list(wilson(3.5, 5)))
    pairs_file = tmp_path / "pairs.jsonl"
    assert (
        main(["review", "--export", str(folder), "--format", "preference", "--output", str(pairs_file)]) == 0
    )
    pairs = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    ordered = Review(folder).items()  # the page shows items in this order: rated a, a, a, b, tie, skip
    assert pairs == [
        {"prompt": i.prompt, "chosen": i.answer_a, "rejected": i.answer_b} for i in ordered[:3]
    ] + [{"prompt": ordered[3].prompt, "chosen": ordered[3].answer_b, "rejected": ordered[3].answer_a}]
    from tunelab.tasks import TASKS

    if "preference" not in TASKS:
        pytest.skip("task=preference is not in this build")
    out = tmp_path / "dpo"
    assert main(["train", f"model={run}", "task=preference", "method=lora", f"data.train={pairs_file}",
                 f"data.validation={pairs_file}", "train.epochs=1", "train.progress_bar=false",
                 f"output_dir={out}"]) == 0  # fmt: skip
    assert "reward_accuracy" in json.loads((out / "eval.json").read_text())["validation"]
